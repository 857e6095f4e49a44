"""Pipelines through a splitting router: the extended-protocol messages up to a Sync are one
implicit transaction, and clients in pipeline mode (psycopg, libpq) send them as they come,
the Sync last. A read may open such a transaction and a write join it later; it must never
meet a replica (README "Read/write splitting": pipelines)."""

from __future__ import annotations

import asyncpg
import psycopg
import pytest

from router.protocol import messages as m
from tests.cluster import Cluster
from tests.harness import RouterThread
from tests.integration.test_splitting import wait_replicas_eligible
from tests.rawclient import RawClient
from tests.unit.test_prepared import FLUSH, SYNC, bind, describe, execute, parse

WHERE = b"SELECT pg_is_in_recovery(), inet_server_port()"


@pytest.fixture
def split_router(start_router, cluster: Cluster) -> RouterThread:
    cluster.psql("CREATE TABLE IF NOT EXISTS split_pipeline (v int)", dbname="app")
    router = start_router(split=True)
    wait_replicas_eligible(router)
    return router


def _run(sql: bytes) -> bytes:
    """Parse, Bind, Describe and Execute of ``sql``, unnamed, as psycopg sends each statement
    of a pipeline (no Sync)."""
    return parse(b"", sql) + bind(b"", b"") + describe(b"P", b"") + execute()


def _send_and_read(router: RouterThread, client: RawClient, data: bytes) -> None:
    """Send ``data`` and wait until the router has read it."""
    router.call(lambda r: [setattr(c, "heard", False) for c in r.clients.values()])
    client.send(data)
    router.wait_for(lambda r: all(c.heard for c in r.clients.values()), what="the messages read")


def _servers(router: RouterThread) -> list:
    return router.call(lambda r: [c.server for c in r.clients.values()])


def _rows_and_errors(replies: list[tuple[bytes, bytes]]) -> tuple[list, list]:
    rows = [m.parse_data_row(body) for kind, body in replies if kind == b"D"]
    errors = [m.parse_error_fields(body) for kind, body in replies if kind == b"E"]
    return rows, errors


def _login(router: RouterThread) -> RawClient:
    client = RawClient(router.port)
    client.login_trust()
    return client


def test_a_pipeline_that_reads_then_writes_runs_whole_on_the_primary(
    split_router: RouterThread, cluster: Cluster
) -> None:
    """The read that opens the pipeline waits for its Sync (no server is taken for it), so
    the write that joins it sends the whole transaction to the primary, as psycopg's
    autocommit pipelines need."""
    primary = str(cluster.primary.port).encode()
    client = _login(split_router)
    _send_and_read(split_router, client, _run(WHERE))
    assert _servers(split_router) == [None], "the read was routed before its Sync came"
    client.send(_run(b"INSERT INTO split_pipeline VALUES (1) RETURNING pg_is_in_recovery()") + SYNC)
    rows, errors = _rows_and_errors(client.recv_until(b"Z"))
    assert errors == []
    assert rows == [[b"f", primary], [b"f"]]
    client.close()
    # The same with psycopg, each statement sent as it is executed.
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        for _ in range(20):
            with conn.pipeline():
                read = conn.execute(WHERE.decode())
                conn.execute("INSERT INTO split_pipeline VALUES (2)")
            assert read.fetchone() == (False, cluster.primary.port)


def test_a_pipeline_of_reads_waits_for_its_sync_and_runs_on_a_replica(
    split_router: RouterThread, cluster: Cluster
) -> None:
    replicas = {r.port for r in cluster.replicas}
    client = _login(split_router)
    _send_and_read(split_router, client, _run(WHERE))
    _send_and_read(split_router, client, _run(b"SELECT 1"))
    assert _servers(split_router) == [None]
    client.send(SYNC)
    rows, errors = _rows_and_errors(client.recv_until(b"Z"))
    assert errors == [] and rows[1] == [b"1"]
    assert rows[0][0] == b"t" and int(rows[0][1]) in replicas
    client.close()
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        for _ in range(10):
            with conn.pipeline():
                reads = [conn.execute(WHERE.decode()) for _ in range(3)]
            assert all(read.fetchone()[0] is True for read in reads)


def test_a_pipeline_that_asks_for_replies_before_its_sync_runs_on_the_primary(
    split_router: RouterThread, cluster: Cluster
) -> None:
    """A Flush asks for the replies so far: they come without the Sync (nothing waits for
    it), and since a write may join the transaction after that round trip, it runs on the
    primary. Also when more of the pipeline follows the Flush in the same write (libpq's
    PQsendFlushRequest between two queries)."""
    primary = [b"f", str(cluster.primary.port).encode()]
    client = _login(split_router)
    client.send(_run(WHERE) + FLUSH + _run(b"SELECT 2"))
    rows, errors = _rows_and_errors(client.recv_until(b"C"))
    assert errors == [] and rows == [primary]
    client.send(_run(b"INSERT INTO split_pipeline VALUES (3) RETURNING 3") + SYNC)
    rows, errors = _rows_and_errors(client.recv_until(b"Z"))
    assert errors == [] and rows == [[b"2"], [b"3"]]
    client.close()
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        with conn.pipeline():
            read = conn.execute(WHERE.decode())
            assert read.fetchone() == (False, cluster.primary.port)  # psycopg sends a Flush
            conn.execute("INSERT INTO split_pipeline VALUES (4)")


def test_a_prepare_flushed_before_its_execute_still_runs_on_a_replica(
    split_router: RouterThread, cluster: Cluster
) -> None:
    """asyncpg's Parse, Describe, Flush, then Bind, Execute, Sync: nothing ran before the
    round trip, and the statement is a read."""
    client = _login(split_router)
    client.send(parse(b"s1", WHERE) + describe(b"S", b"s1") + FLUSH)
    client.recv_until(b"T")
    client.send(bind(b"", b"s1") + execute() + SYNC)
    rows, errors = _rows_and_errors(client.recv_until(b"Z"))
    assert errors == [] and rows[0][0] == b"t"
    client.close()


def test_a_segment_opened_behind_a_replicas_read_is_routed_afresh(split_router: RouterThread, cluster: Cluster) -> None:
    """A read runs on a replica; before its reply, the client opens the next segment with a
    read, then a write joins it. That segment must not follow the first onto the replica: it
    waits for the replica's work to end and is routed as a whole. The first read waits on
    the replicas for a lock the primary holds, so the second arrives while it runs."""
    from tests.integration.test_splitting_failures import _lock_replayed, _lock_waiter

    cluster.psql("CREATE TABLE IF NOT EXISTS split_pipeline_lock (v int)", dbname="app")
    cluster.wait_replay()
    primary = [b"f", str(cluster.primary.port).encode()]
    client = _login(split_router)
    first = b"SELECT pg_is_in_recovery() FROM split_pipeline_lock RIGHT JOIN (VALUES (1)) v ON true"
    with psycopg.connect(cluster.primary.dsn("app")) as locker:
        locker.execute("LOCK TABLE split_pipeline_lock IN ACCESS EXCLUSIVE MODE")
        _lock_replayed(cluster, "split_pipeline_lock")
        client.send(_run(first) + SYNC)
        _lock_waiter(cluster, first.decode(), cluster.replicas)
        _send_and_read(split_router, client, _run(WHERE))
        assert split_router.call(lambda r: [c._reroute for c in r.clients.values()]) == [True]
        client.send(_run(b"INSERT INTO split_pipeline VALUES (5) RETURNING 5") + SYNC)
    rows, errors = _rows_and_errors(client.recv_until(b"Z"))
    assert errors == [] and rows == [[b"t"]]
    rows, errors = _rows_and_errors(client.recv_until(b"Z"))
    assert errors == [] and rows == [primary, [b"5"]]
    client.close()


def test_a_long_pipeline_without_a_sync_runs_on_the_primary(split_router: RouterThread, cluster: Cluster) -> None:
    """Past what the router holds for a Sync, the read is routed (to the primary: what
    follows may write) rather than stop reading the client."""
    client = _login(split_router)
    big = b"SELECT pg_is_in_recovery(), length('" + b"x" * (100 * 1024) + b"')"
    client.send(_run(big))
    split_router.wait_for(lambda r: [c.server is not None for c in r.clients.values()] == [True], what="routed")
    client.send(_run(b"INSERT INTO split_pipeline VALUES (6) RETURNING 6") + SYNC)
    rows, errors = _rows_and_errors(client.recv_until(b"Z"))
    assert errors == [] and rows == [[b"f", str(100 * 1024).encode()], [b"6"]]
    client.close()


def test_a_write_after_a_prepare_on_a_replica_runs_on_the_primary(split_router: RouterThread, cluster: Cluster) -> None:
    """asyncpg's prepare (Parse, Describe, Flush) leaves its implicit transaction open until
    the client's next Sync or Query: a write sent next joins it. The replica had only parsed
    and described: the router ends its segment there (the client never sees that
    ReadyForQuery) and the write runs on the primary, as on PostgreSQL."""
    primary = str(cluster.primary.port).encode()
    client = _login(split_router)
    client.send(parse(b"s1", WHERE) + describe(b"S", b"s1") + FLUSH)
    client.recv_until(b"T")
    assert split_router.call(lambda r: [c.replica_node is not None for c in r.clients.values()]) == [True]
    client.send(m.query("INSERT INTO split_pipeline VALUES (7) RETURNING pg_is_in_recovery(), inet_server_port()"))
    rows, errors = _rows_and_errors(client.recv_until(b"Z"))
    assert errors == [] and rows == [[b"f", primary]]
    # One ReadyForQuery: the next reply is the next query's.
    client.send(bind(b"", b"s1") + execute() + SYNC)
    replies = client.recv_until(b"Z")
    assert [kind for kind, _ in replies] == [b"2", b"D", b"C", b"Z"], replies
    client.close()


async def test_asyncpg_writes_after_a_prepare(split_router: RouterThread, cluster: Cluster) -> None:
    conn = await asyncpg.connect(split_router.dsn("carol", "app"))
    try:
        for i in range(3):
            # A new text each time: asyncpg prepares it (Parse, Describe, Flush) on a replica.
            statement = await conn.prepare(f"SELECT pg_is_in_recovery(), {i}")
            await conn.execute("INSERT INTO split_pipeline VALUES (8)")  # a Query
            statement = await conn.prepare(f"SELECT pg_is_in_recovery(), {i} + 10")
            await conn.execute("INSERT INTO split_pipeline VALUES ($1)", 9)  # Parse, Describe, Flush...
            assert (await statement.fetchrow())[1] == i + 10
    finally:
        await conn.close()


def test_a_write_behind_a_prepare_that_fails_late_on_the_replica_never_runs(
    split_router: RouterThread, cluster: Cluster
) -> None:
    """The write came while the replica's Parse was still running; it then failed. PostgreSQL
    would skip the write (everything up to the Sync after an error), which the router cannot
    do on the primary: the client is told so and disconnected, and the write never runs. The
    Parse waits on the replica for a lock the primary holds, whose transaction then drops the
    table."""
    from tests.integration.test_splitting_failures import _lock_replayed, _lock_waiter

    cluster.psql("DROP TABLE IF EXISTS split_pipeline_gone; CREATE TABLE split_pipeline_gone (v int)", dbname="app")
    cluster.wait_replay()
    sql = "SELECT pg_is_in_recovery() FROM split_pipeline_gone"
    client = _login(split_router)
    with psycopg.connect(cluster.primary.dsn("app")) as locker:
        locker.execute("LOCK TABLE split_pipeline_gone IN ACCESS EXCLUSIVE MODE")
        _lock_replayed(cluster, "split_pipeline_gone")
        client.send(parse(b"s1", sql.encode()) + describe(b"S", b"s1") + FLUSH)
        _lock_waiter(cluster, sql, cluster.replicas)
        _send_and_read(split_router, client, m.query("INSERT INTO split_pipeline VALUES (77)"))
        assert split_router.call(lambda r: [c._reroute and c.server.drop_z for c in r.clients.values()]) == [1]
        locker.execute("DROP TABLE split_pipeline_gone")
    kind, body = client.recv_message()
    assert kind == b"E" and m.parse_error_fields(body)["C"] == "42P01"
    fields = client.error_and_close()
    assert fields["S"] == "FATAL" and fields["C"] == "0A000"
    assert cluster.psql("SELECT count(*) FROM split_pipeline WHERE v = 77", dbname="app").strip() == "0"
    split_router.wait_for(lambda r: not r.clients, what="the client gone")
