"""Read/write splitting when replicas lag, stop, and the primary fails over.

These tests pause replay, stop nodes and promote one, so they run on a cluster of their own
(module-scoped). They run in file order; the failover test, which leaves the old primary
stopped, is last. Waits are polls with deadlines on the router's own state.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from router.config import Settings
from router.protocol import messages as m
from router.protocol.framing import frame
from router.topology import TopologyMonitor
from router.topology.lsn import LONG_PAGE_HEADER, parse_lsn
from tests.cluster import HOST, Cluster
from tests.conftest import router_config
from tests.harness import RouterThread
from tests.rawclient import RawClient

WHERE = "SELECT pg_is_in_recovery(), inet_server_port()"
INTERVAL = 0.25


@pytest.fixture(scope="module")
def split_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("splitting")
    with Cluster(base, replicas=2, redis=False, ssl=False, pgbench_scale=None) as cluster:
        cluster.psql("CREATE TABLE rows (id bigint PRIMARY KEY, at timestamptz DEFAULT now())", dbname="app")
        cluster.wait_replay()
        yield cluster


@pytest.fixture
def make_router(split_cluster: Cluster) -> Iterator:
    started: list[RouterThread] = []

    def make(**cluster_settings: Any) -> RouterThread:
        settings: dict[str, Any] = {}
        for key in ("read_your_writes", "transaction_routing", "databases", "pool_size"):
            if key in cluster_settings:
                settings[key] = cluster_settings.pop(key)
        config = router_config(split_cluster, split=True, lag_check_interval=INTERVAL, **settings)
        config["clusters"]["main"].update(cluster_settings)
        router = RouterThread(Settings(**config)).start()
        started.append(router)
        router.wait_for(lambda r: len(r.splits["main"].topology.eligible_replicas()) == 2,
                        what="both replicas eligible")
        return router

    yield make
    for router in started:
        router.stop()


def replay(cluster: Cluster, index: int, paused: bool) -> None:
    fn = "pg_wal_replay_pause" if paused else "pg_wal_replay_resume"
    cluster.psql(f"SELECT {fn}()", node=cluster.replicas[index])


class Writer:
    """Keeps the primary's WAL moving (directly, not through the router)."""

    def __init__(self, cluster: Cluster) -> None:
        self.dsn = cluster.primary.dsn("app")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.wait(0.02):
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS churn (x int); INSERT INTO churn VALUES (1)")

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


def eligible(router: RouterThread, port: int) -> bool:
    return router.call(lambda r: r.splits["main"].topology.node("127.0.0.1", port).eligible)


def read_ports(conn: psycopg.Connection, n: int) -> Counter:
    ports: Counter = Counter()
    for _ in range(n):
        ports[conn.execute(WHERE).fetchone()[1]] += 1
    return ports


def test_paused_replica_skipped_then_used_again(make_router, split_cluster: Cluster) -> None:
    router = make_router(max_replica_lag=0.5)
    paused = split_cluster.replicas[0]
    with Writer(split_cluster), psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        assert paused.port in read_ports(conn, 100)
        replay(split_cluster, 0, paused=True)
        try:
            started = time.monotonic()
            router.wait_for(lambda r: not r.splits["main"].topology.node("127.0.0.1", paused.port).eligible,
                            timeout=10, what="the paused replica to lose eligibility")
            print(f"paused replica skipped after {time.monotonic() - started:.2f} s "
                  f"(max_replica_lag 0.5 s, lag_check_interval {INTERVAL} s)")
            ports = read_ports(conn, 200)
            assert paused.port not in ports, ports
            assert set(ports) == {split_cluster.replicas[1].port}
        finally:
            replay(split_cluster, 0, paused=False)
        router.wait_for(lambda r: r.splits["main"].topology.node("127.0.0.1", paused.port).eligible,
                        timeout=10, what="the resumed replica to be eligible again")
        assert paused.port in read_ports(conn, 100)


def test_replica_affinity_session(make_router, split_cluster: Cluster) -> None:
    """replica_affinity = session: a client keeps the replica it read from last while that one
    is among the least busy; new clients still pick at random; a busier replica loses the tie,
    an ineligible one the client, which then stays where it went."""
    router = make_router(max_replica_lag=0.5, replica_affinity="session")
    replicas = {r.port for r in split_cluster.replicas}
    with Writer(split_cluster), psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        ports = read_ports(conn, 100)
        assert len(ports) == 1 and set(ports) <= replicas, ports
        (home,) = ports
        (other,) = replicas - {home}
        firsts = set()
        for _ in range(30):  # each new client's first read: random (all on one: p = 2^-29)
            with psycopg.connect(router.dsn("carol"), autocommit=True) as new:
                firsts.add(new.execute(WHERE).fetchone()[1])
        assert firsts == replicas
        # Another client's read-only transaction in flight on `home`: busier, it loses the tie.
        while True:
            holder = psycopg.connect(router.dsn("carol"))
            holder.execute("SET TRANSACTION READ ONLY")
            if holder.execute(WHERE).fetchone()[1] == home:
                break
            holder.close()
        try:
            assert read_ports(conn, 20) == Counter({other: 20})
        finally:
            holder.close()
        assert read_ports(conn, 50) == Counter({other: 50})  # idle again: it stays
        index = [r.port for r in split_cluster.replicas].index(other)
        replay(split_cluster, index, paused=True)
        try:
            router.wait_for(lambda r: not r.splits["main"].topology.node("127.0.0.1", other).eligible,
                            timeout=10, what="the paused replica to lose eligibility")
            assert read_ports(conn, 50) == Counter({home: 50})
        finally:
            replay(split_cluster, index, paused=False)
        router.wait_for(lambda r: r.splits["main"].topology.node("127.0.0.1", other).eligible,
                        timeout=10, what="the resumed replica to be eligible again")
        assert read_ports(conn, 50) == Counter({home: 50})


@pytest.mark.parametrize("fallback", ["primary", "error"])
def test_every_replica_lagging(make_router, split_cluster: Cluster, fallback: str) -> None:
    router = make_router(max_replica_lag=0.3, replica_fallback=fallback)
    with Writer(split_cluster), psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        replay(split_cluster, 0, paused=True)
        replay(split_cluster, 1, paused=True)
        try:
            router.wait_for(lambda r: not r.splits["main"].topology.eligible_replicas(),
                            timeout=10, what="no replica eligible")
            if fallback == "primary":
                assert read_ports(conn, 50) == Counter({split_cluster.primary.port: 50})
                fallbacks = router.call(lambda r: dict(r.splits["main"].fallbacks))
                assert fallbacks.get("lag_fallback", 0) >= 50
            else:
                for _ in range(5):
                    with pytest.raises(psycopg.errors.CannotConnectNow, match="too far behind"):
                        conn.execute(WHERE)
                # Writes are not affected, and the connection stays usable.
                row = conn.execute("INSERT INTO rows VALUES (-1) ON CONFLICT DO NOTHING RETURNING 1").fetchall()
                assert row in ([(1,)], [])
        finally:
            replay(split_cluster, 0, paused=False)
            replay(split_cluster, 1, paused=False)


def test_read_your_writes(make_router, split_cluster: Cluster) -> None:
    # A huge lag limit keeps the paused replica eligible: only read-your-writes keeps a
    # session away from it.
    router = make_router(max_replica_lag=3600)
    lagging = split_cluster.replicas[0]
    replay(split_cluster, 0, paused=True)
    try:
        with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
            conn.execute("DELETE FROM rows")
            on_replica = 0
            for i in range(1000):
                conn.execute("INSERT INTO rows (id) VALUES (%s)", (i,))
                seen, in_recovery, port = conn.execute(
                    "SELECT EXISTS (SELECT FROM rows WHERE id = %s), pg_is_in_recovery(), inet_server_port()",
                    (i,),
                ).fetchone()
                assert seen, f"row {i} not visible to the session that wrote it (port {port})"
                assert port != lagging.port
                on_replica += in_recovery
            # Once the monitor has sampled the primary after the write, reads go back to the
            # replicas that have replayed that far, and only those.
            for i in range(1000, 1030):
                conn.execute("INSERT INTO rows (id) VALUES (%s)", (i,))
                target = router.call(lambda r: r.splits["main"].monitor.rounds_completed) + 2
                router.wait_for(lambda r, t=target: r.splits["main"].monitor.rounds_completed >= t,
                                what="two monitor rounds")
                seen, in_recovery, port = conn.execute(
                    "SELECT EXISTS (SELECT FROM rows WHERE id = %s), pg_is_in_recovery(), inet_server_port()",
                    (i,),
                ).fetchone()
                assert seen and port != lagging.port
                on_replica += in_recovery
            print(f"read-your-writes: {on_replica} of 1030 reads after a write ran on a replica")
            assert on_replica > 0, "reads never went back to the caught-up replica"
    finally:
        replay(split_cluster, 0, paused=False)


def test_read_your_writes_target_after_a_wal_switch(split_cluster: Cluster) -> None:
    """After a WAL switch (pg_basebackup, archive_timeout) the primary's insert position lies
    past the new segment's page header, where no replica's replay position ends until another
    record is written. The monitor's sample must name the boundary itself as the position a
    session's reads wait for, or a session whose write logged nothing would read from the
    primary until the WAL moved on (15 s and more on a quiet primary)."""

    async def sample_right_after_a_switch() -> tuple[int, int]:
        monitor = TopologyMonitor([(HOST, split_cluster.primary.port)], dbname="app")
        conn = await asyncpg.connect(host=HOST, port=split_cluster.primary.port, user="postgres", database="app")
        try:
            segment = int(await conn.fetchval("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'"))
            for _ in range(50):  # the bgwriter soon logs a record past the header: race it
                # (pg_switch_wal returns the end of the switch record, in the finished segment.)
                switched = parse_lsn(await conn.fetchval("SELECT pg_switch_wal()::text"))
                next_segment = (switched // segment + 1) * segment
                sample = await monitor._sample(monitor.topology.nodes[0])
                # The insert position only moves on: still past the header now, so it was then.
                if parse_lsn(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")) == next_segment + LONG_PAGE_HEADER:
                    return next_segment, sample.insert_lsn
            raise AssertionError("never sampled the insert position right after a WAL switch")
        finally:
            await conn.close()
            for node_conn in monitor._connections.values():
                await node_conn.close()

    next_segment, sampled = asyncio.run(sample_right_after_a_switch())
    assert sampled == next_segment  # where a replica that has replayed everything stands


def test_without_read_your_writes_the_lagging_replica_serves_stale_reads(
    make_router, split_cluster: Cluster
) -> None:
    router = make_router(max_replica_lag=3600, read_your_writes="off")
    replay(split_cluster, 0, paused=True)
    try:
        with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
            stale = 0
            for i in range(2000, 2200):
                conn.execute("INSERT INTO rows (id) VALUES (%s)", (i,))
                stale += not conn.execute("SELECT EXISTS (SELECT FROM rows WHERE id = %s)", (i,)).fetchone()[0]
            print(f"read_your_writes = off: {stale} of 200 reads missed the session's own row")
            assert stale > 0
    finally:
        replay(split_cluster, 0, paused=False)


SEEN = "SELECT EXISTS (SELECT FROM rows WHERE id = %s), pg_is_in_recovery(), inet_server_port()"


def _two_entries(router_databases: dict) -> dict:
    """`app` and `other`: two [databases] entries on the split cluster, one real database."""
    app = router_databases["app"]
    return {"app": app, "other": {**app, "dbname": "app"}}


def test_read_your_writes_tenant(make_router, split_cluster: Cluster) -> None:
    """read_your_writes = tenant: a row one session of a database entry inserts is seen at
    once by another session of that entry (an application's connection pool), 300 times,
    with one replica lagging. Sessions of another entry are not held back by those writes,
    and once the monitor has sampled the primary the entry's reads go to replicas again."""
    databases = _two_entries(router_config(split_cluster)["databases"])
    router = make_router(max_replica_lag=3600, read_your_writes="tenant", databases=databases)
    lagging = split_cluster.replicas[0]
    replay(split_cluster, 0, paused=True)
    try:
        with (
            psycopg.connect(router.dsn("carol"), autocommit=True) as writer,
            psycopg.connect(router.dsn("carol"), autocommit=True) as reader,
            psycopg.connect(router.dsn("carol", dbname="other"), autocommit=True) as elsewhere,
        ):
            other_on_replica = 0
            for i in range(3000, 3300):
                writer.execute("INSERT INTO rows (id) VALUES (%s)", (i,))
                seen, _, port = reader.execute(SEEN, (i,)).fetchone()
                assert seen, f"row {i} not visible to another session of the entry (port {port})"
                assert port != lagging.port
                other_on_replica += elsewhere.execute(SEEN, (i,)).fetchone()[1]
            assert other_on_replica == 300, "another entry's reads waited for these writes"
            on_replica = 0
            for i in range(3300, 3320):
                writer.execute("INSERT INTO rows (id) VALUES (%s)", (i,))
                target = router.call(lambda r: r.splits["main"].monitor.rounds_completed) + 2
                router.wait_for(lambda r, t=target: r.splits["main"].monitor.rounds_completed >= t,
                                what="two monitor rounds")  # fmt: skip
                seen, in_recovery, port = reader.execute(SEEN, (i,)).fetchone()
                assert seen and port != lagging.port
                on_replica += in_recovery
            assert on_replica == 20, "reads never went back to the caught-up replica"
    finally:
        replay(split_cluster, 0, paused=False)


def test_read_your_writes_session_does_not_cover_other_sessions(make_router, split_cluster: Cluster) -> None:
    """The contrast that proves the test above: with read_your_writes = session, another
    session of the same entry does read from the lagging replica and misses rows."""
    router = make_router(max_replica_lag=3600, read_your_writes="session")
    replay(split_cluster, 0, paused=True)
    try:
        with (
            psycopg.connect(router.dsn("carol"), autocommit=True) as writer,
            psycopg.connect(router.dsn("carol"), autocommit=True) as reader,
        ):
            stale = 0
            for i in range(3400, 3600):
                writer.execute("INSERT INTO rows (id) VALUES (%s)", (i,))
                stale += not reader.execute(SEEN, (i,)).fetchone()[0]
            print(f"read_your_writes = session: {stale} of 200 reads by another session missed the row")
            assert stale > 0
    finally:
        replay(split_cluster, 0, paused=False)


def test_a_named_parse_retried_on_another_node(make_router, split_cluster: Cluster) -> None:
    """A replica backend that dies while a client's Parse of a named statement waits there,
    before any reply: the read runs again elsewhere, and there the Parse prepares the
    statement (the first attempt's did not take), rather than meeting its own name (42P05)."""
    router = make_router()
    split_cluster.psql("CREATE TABLE IF NOT EXISTS held (x int)", dbname="app")
    split_cluster.wait_replay()
    query = "SELECT count(*), inet_server_port() FROM held"
    result: dict[str, Any] = {}

    def read() -> None:
        try:
            with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
                result["first"] = conn.execute(query, prepare=True).fetchone()
                result["again"] = conn.execute(query, prepare=True).fetchone()
        except psycopg.Error as exc:
            result["error"] = exc

    # The primary's ACCESS EXCLUSIVE lock is replayed on the replicas: a read of the table
    # waits there, with its Parse (parse analysis takes the table's lock) unanswered.
    with psycopg.connect(split_cluster.primary.dsn("app")) as locker:
        locker.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
        _lock_replayed(split_cluster, "held")
        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        victim, pid = _lock_waiter(split_cluster, query, split_cluster.replicas)
        split_cluster.psql(f"SELECT pg_terminate_backend({pid})", node=victim)
        # Retried: it waits for the lock again, on another node.
        _lock_waiter(split_cluster, query, [n for n in split_cluster.nodes if n is not victim])
    thread.join(10)
    assert "error" not in result, result["error"]
    assert result["first"][0] == 0 and result["first"][1] != victim.port
    assert result["again"][0] == 0


def test_a_stand_in_parse_reply_read_with_the_fatal_is_taken_back(make_router, split_cluster: Cluster) -> None:
    """The replica connection already has the client's statement, so the router answers its
    Parse with a stand-in whose reply waits in the server's output buffer while the Bind
    behind it waits for a lock; the backend then dies and the reply comes in one read with
    its FATAL. The read is retried elsewhere, and the client's statement name, which that
    dropped reply had given it, is free again for the Parse sent there."""
    router = make_router(pool_size=1)  # one server connection per node
    split_cluster.psql("CREATE TABLE IF NOT EXISTS held (x int)", dbname="app")
    split_cluster.wait_replay()
    query = "SELECT count(*), inet_server_port() FROM held"
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    while seen != {r.port for r in split_cluster.replicas}:  # each replica's connection prepares it
        assert time.monotonic() < deadline, f"reads reached only {seen}"
        with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
            seen.add(conn.execute(query, prepare=True).fetchone()[1])
    client = RawClient(router.port)
    client.login_trust()
    with psycopg.connect(split_cluster.primary.dsn("app")) as locker:
        locker.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
        _lock_replayed(split_cluster, "held")
        client.send(
            frame(b"P", b"s1\0" + query.encode() + b"\0\0\0")
            + frame(b"B", b"\0s1\0" + b"\0" * 6)
            + frame(b"E", b"\0\0\0\0\0")
            + m.sync()
        )
        victim, pid = _lock_waiter(split_cluster, query, split_cluster.replicas)
        split_cluster.psql(f"SELECT pg_terminate_backend({pid})", node=victim)
        _lock_waiter(split_cluster, query, [n for n in split_cluster.nodes if n is not victim])
    reply = client.recv_until(b"Z")
    assert [t for t, _ in reply] == [b"1", b"2", b"D", b"C", b"Z"], reply
    assert m.parse_data_row(reply[2][1])[1] != str(victim.port).encode()
    client.close()


def _lock_replayed(cluster: Cluster, table: str) -> None:
    """Until every replica holds the ACCESS EXCLUSIVE lock an open transaction on the primary
    took on ``table``: reads of it wait there (parse analysis locks the table)."""
    cluster.psql("SELECT txid_current()")  # a commit: WAL flushed, the lock record streamed
    deadline = time.monotonic() + 10
    for replica in cluster.replicas:
        while cluster.psql(
            f"SELECT count(*) FROM pg_locks WHERE relation = '{table}'::regclass AND mode = 'AccessExclusiveLock'",
            node=replica, dbname="app",
        ).strip() != "1":
            assert time.monotonic() < deadline, "the lock was not replayed"


def _lock_waiter(cluster: Cluster, query: str, nodes) -> tuple[Any, str]:
    """The node and pid of the backend running ``query`` that waits for a lock, among
    ``nodes`` (polled until one does)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for node in nodes:
            pid = cluster.psql(
                f"SELECT pid FROM pg_stat_activity WHERE query = '{query}' AND wait_event_type = 'Lock'",
                node=node, dbname="app",
            ).strip()
            if pid:
                return node, pid
    raise AssertionError(f"no backend waits for a lock with {query!r} on {[n.port for n in nodes]}")


def test_replica_stopped_mid_load(make_router, split_cluster: Cluster) -> None:
    router = make_router(max_replica_lag=5)
    victim = split_cluster.replicas[1]
    errors: list[Exception] = []
    ports: Counter = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def reader() -> None:
        try:
            with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
                while not stop.is_set():
                    try:
                        _, port = conn.execute("SELECT pg_sleep(0.005), inet_server_port()").fetchone()
                        with lock:
                            ports[port] += 1
                    except psycopg.Error as exc:
                        errors.append(exc)
                        return
        except psycopg.Error as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while ports[victim.port] < 20 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        victim.stop(mode="immediate")
        router.wait_for(lambda r: not r.splits["main"].topology.node("127.0.0.1", victim.port).healthy,
                        what="the stopped replica marked down")
        with lock:
            before = ports[victim.port]
        time.sleep(1.0)  # load continues without the replica
        with lock:
            assert ports[victim.port] == before
        victim.start()
        router.wait_for(lambda r: r.splits["main"].topology.node("127.0.0.1", victim.port).eligible,
                        timeout=20, what="the restarted replica eligible again")
        deadline = time.monotonic() + 10
        while ports[victim.port] == before and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        if not victim.is_running():
            victim.start()
    assert not errors, errors
    assert ports[victim.port] > before, "the restarted replica was not used again"
    print(f"reads per node: {dict(ports)}")


def test_failover_to_promoted_replica(make_router, split_cluster: Cluster) -> None:
    """Last in the module: the old primary stays stopped."""
    router = make_router()
    old_primary, new_primary = split_cluster.primary, split_cluster.replicas[0]
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        assert conn.execute("INSERT INTO rows VALUES (-100) RETURNING inet_server_port()").fetchone()[0] == old_primary.port
        old_primary.stop(mode="immediate")
        new_primary.promote()
        started = time.monotonic()
        errors: Counter = Counter()
        row = None
        while time.monotonic() - started < 15:
            try:
                row = conn.execute(
                    "INSERT INTO rows VALUES (-101) RETURNING inet_server_port(), pg_is_in_recovery()"
                ).fetchone()
                break
            except psycopg.errors.ReadOnlySqlTransaction:
                pytest.fail("a write was sent to a node in recovery")
            except psycopg.OperationalError as exc:
                errors[exc.sqlstate] += 1
                if conn.closed:
                    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
                time.sleep(0.1)
        assert row == (new_primary.port, False), f"no write succeeded after failover: {errors}"
        print(f"writes resumed {time.monotonic() - started:.2f} s after the failover; errors meanwhile: {dict(errors)}")
        assert set(errors) <= {"57P03", "08006", None}, errors
