"""Pool behaviour against the real primary: limits, timeouts, broken servers and clients."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

import psycopg
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors

from router.admin.console import worker_rows
from router.admin.metrics import metrics_registry
from router.protocol import messages as m
from router.protocol.framing import frame
from tests.conftest import router_config
from tests.rawclient import RawClient


def server_pids(router) -> set[int]:
    return router.call(lambda r: {s.backend_pid for p in r.pools.pools.values() for s in p.servers})


def test_pool_exhaustion_waits_then_fails_with_53300(start_router):
    router = start_router(pool_size=1, query_wait_timeout=0.5)
    holder = psycopg.connect(router.dsn("carol"), autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")  # holds the only server connection
    waiter = psycopg.connect(router.dsn("carol"), autocommit=True)
    with pytest.raises(errors.TooManyConnections) as exc:
        waiter.execute("SELECT 2")
    assert exc.value.sqlstate == "53300"
    assert "query_wait_timeout" in str(exc.value) and "app/postgres@" in str(exc.value)
    # The waiting client keeps its connection and gets through once the pool frees up.
    holder.execute("COMMIT")
    assert waiter.execute("SELECT 3").fetchone() == (3,)
    holder.close()
    waiter.close()


def test_waiters_are_served_when_a_connection_frees_up(start_router):
    router = start_router(pool_size=1, query_wait_timeout=10)
    holder = psycopg.connect(router.dsn("carol"), autocommit=True)
    holder.execute("BEGIN")
    results: list[int] = []

    def wait_and_query(i: int) -> None:
        with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
            results.append(conn.execute("SELECT %s::int", (i,)).fetchone()[0])

    threads = [threading.Thread(target=wait_and_query, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    router.wait_for(lambda r: sum(p.stats()["waiting"] for p in r.pools.pools.values()) == 5, what="5 waiters")
    holder.execute("COMMIT")
    for t in threads:
        t.join(10)
    assert sorted(results) == [0, 1, 2, 3, 4]
    holder.close()


def test_max_client_conn(start_router):
    router = start_router(max_client_conn=2)
    a = psycopg.connect(router.dsn("carol"))
    b = psycopg.connect(router.dsn("carol"))
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(router.dsn("carol"))
    assert "too many clients" in str(exc.value)
    a.close()
    router.wait_for(lambda r: r.client_count == 1, what="client count to drop")
    psycopg.connect(router.dsn("carol")).close()
    b.close()


def test_min_pool_size_is_opened_at_start_and_kept(start_router):
    router = start_router(pool_size=4, min_pool_size=2)
    router.wait_for(lambda r: sum(p.stats()["idle"] for p in r.pools.pools.values()) == 2, what="2 idle servers")
    # Close one behind the router's back: the janitor opens a replacement.
    router.call(lambda r: next(iter(next(iter(r.pools.pools.values())).servers)).transport.abort())
    router.wait_for(lambda r: sum(p.stats()["idle"] for p in r.pools.pools.values()) == 2, what="pool topped up")


def test_a_database_s_own_min_pool_size(start_router):
    """databases.NAME.min_pool_size, as PgBouncer's per-database one, over the global 0."""
    router = start_router(
        pool_size=4, min_pool_size=0,
        databases={"app": {"cluster": "main", "server_user": "postgres", "min_pool_size": 2}},
    )  # fmt: skip
    router.wait_for(lambda r: sum(p.stats()["idle"] for p in r.pools.pools.values()) == 2, what="2 idle servers")


def test_server_idle_timeout_closes_idle_servers(start_router):
    router = start_router(server_idle_timeout=0.3)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SELECT 1")
    assert sum(s["servers"] for s in router.pool_stats().values()) == 1
    router.wait_for(lambda r: sum(p.stats()["servers"] for p in r.pools.pools.values()) == 0, what="idle server closed")


def test_server_lifetime_retires_connections(start_router):
    router = start_router(server_lifetime=0.2, server_idle_timeout=0)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    time.sleep(0.3)  # let the connection outlive server_lifetime (the thing under test)
    second = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert first != second
    conn.close()


def test_server_connect_failure_reported(start_router, cluster):
    router = start_router(
        clusters={"main": {"primary": {"host": "127.0.0.1", "port": _closed_port()}}},
        server_connect_timeout=2,
    )
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(router.dsn("carol"))
    assert "could not connect to server" in str(exc.value)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_server_breaking_mid_transaction_gives_08006_and_is_not_reused(start_router):
    router = start_router(pool_size=2)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    conn.execute("BEGIN")
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    # Break the TCP connection to the server under the client's feet.
    router.call(lambda r: next(s for p in r.pools.pools.values() for s in p.servers if s.backend_pid == pid).transport.abort())
    with pytest.raises(psycopg.OperationalError) as exc:
        conn.execute("SELECT 1")
    assert exc.value.sqlstate == "08006"
    assert pid not in server_pids(router)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
        assert other.execute("SELECT pg_backend_pid()").fetchone()[0] != pid


def test_server_terminated_by_admin_is_not_reused(start_router, cluster):
    router = start_router(pool_size=1)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    conn.execute("BEGIN")
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    cluster.psql(f"SELECT pg_terminate_backend({pid})")
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    router.wait_for(lambda r: pid not in {s.backend_pid for p in r.pools.pools.values() for s in p.servers}, what="dead server forgotten")
    with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
        assert other.execute("SELECT pg_backend_pid()").fetchone()[0] != pid


def test_a_server_s_fatal_mid_transaction_is_the_client_s_last_message(start_router, cluster):
    """The server ends the session of a client inside a transaction (pg_terminate_backend):
    the client reads PostgreSQL's FATAL, then the end of the connection, as it would from
    PostgreSQL; the router adds no error of its own behind it."""
    router = start_router(pool_size=1)
    client = RawClient(router.port)
    client.login_trust()
    client.send(m.query("BEGIN") + m.query("SELECT pg_backend_pid()"))
    client.recv_until(b"Z")
    reply = client.recv_until(b"Z")
    pid = int(m.parse_data_row(reply[1][1])[0])
    cluster.psql(f"SELECT pg_terminate_backend({pid})")
    msg = client.recv_message()
    assert msg is not None and msg[0] == b"E"
    fields = m.parse_error_fields(msg[1])
    assert (fields["V"], fields["C"]) == ("FATAL", "57P01")
    assert client.recv_message() is None, "something followed the FATAL"
    router.wait_for(lambda r: pid not in {s.backend_pid for p in r.pools.pools.values() for s in p.servers},
                    what="dead server forgotten")


def test_a_fatal_read_with_the_last_ready_for_query_stays_with_the_server(start_router, cluster):
    """A server that ends its session right after a transaction (idle_session_timeout here;
    pg_terminate_backend, a shutdown) sends its FATAL unasked. Read in one chunk with the
    transaction's last ReadyForQuery, it is not the client's: the client never sees it, and
    the dying connection is not pooled."""
    router = start_router(pool_size=1)
    cluster.psql("CREATE TABLE IF NOT EXISTS fatal_behind_ready (x int)", dbname="app")
    client = RawClient(router.port)
    client.login_trust()
    with psycopg.connect(cluster.primary.dsn("app")) as locker:
        locker.execute("LOCK TABLE fatal_behind_ready IN ACCESS EXCLUSIVE MODE")
        # One Query, so that the server is never idle between the two (it would end its
        # session there). The setting then stays with the client, as any SET does.
        sql = "SET idle_session_timeout = 50; SELECT count(*) FROM fatal_behind_ready"
        client.send(m.query(sql))
        pid = None
        deadline = time.monotonic() + 10
        while pid is None and time.monotonic() < deadline:
            # (Not in the locker's transaction: pg_stat_activity is read once per transaction.)
            pid = cluster.psql(
                f"SELECT pid FROM pg_stat_activity WHERE query = '{sql}' AND wait_event_type = 'Lock'"
            ).strip() or None
        assert pid is not None, "the query never waited for the lock"
        # Stall the router's loop; meanwhile the query completes and its backend, idle past
        # idle_session_timeout, sends FATAL 57P05 and exits. Both wait in one socket buffer.
        stalled, resume = threading.Event(), threading.Event()
        router.loop.call_soon_threadsafe(lambda: (stalled.set(), resume.wait(20)))
        assert stalled.wait(10)
    try:
        deadline = time.monotonic() + 10
        while cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}").strip() != "0":
            assert time.monotonic() < deadline, "the backend outlived idle_session_timeout"
    finally:
        resume.set()
    reply = client.recv_until(b"Z")
    assert [t for t, _ in reply] == [b"C", b"T", b"D", b"C", b"Z"], reply
    assert reply[-1] == (b"Z", b"I")
    # Nothing of the FATAL follows: the next reply is the next query's own.
    client.send(m.query("SELECT 2"))
    reply = client.recv_until(b"Z")
    assert [t for t, _ in reply] == [b"T", b"D", b"C", b"Z"], reply
    assert int(pid) not in server_pids(router)
    client.close()


def test_copy_data_sent_while_waiting_for_a_server_follows_its_copy(start_router, cluster):
    """asyncpg sends a COPY FROM STDIN's data right behind the query, without waiting for
    CopyInResponse. When the query waits for a server connection (pool busy, or one being
    opened), that data is the COPY's and must follow it there, not be dropped as the
    leftovers of a failed COPY: the server would wait for it for ever, and so would the
    client."""
    router = start_router(pool_size=1)
    cluster.psql("CREATE TABLE IF NOT EXISTS copy_waiting (x int)", dbname="app")
    holder = psycopg.connect(router.dsn("carol"), autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")  # holds the only server connection
    client = RawClient(router.port)
    client.login_trust()

    def send_and_wait_until_read(data: bytes) -> None:
        router.call(lambda r: [setattr(c, "heard", False) for c in r.clients.values()])
        client.send(data)
        router.wait_for(lambda r: all(c.heard or c.server is not None for c in r.clients.values()),
                        what="the client's bytes read")

    send_and_wait_until_read(m.query("COPY copy_waiting FROM STDIN"))
    send_and_wait_until_read(frame(b"d", b"1\n") + frame(b"d", b"2\n") + frame(b"c", b""))
    holder.execute("COMMIT")
    reply = client.recv_until(b"Z")
    assert [t for t, _ in reply] == [b"G", b"C", b"Z"], reply
    assert reply[1][1] == b"COPY 2\0"
    assert cluster.psql("SELECT count(*) FROM copy_waiting", dbname="app").strip() == "2"
    client.close()
    holder.close()


def test_client_disconnecting_mid_transaction(start_router, cluster):
    """The next client on that server connection starts outside any transaction and sees none
    of the dead client's uncommitted work."""
    cluster.psql("CREATE TABLE IF NOT EXISTS dead_client (marker text)", dbname="app")
    router = start_router(pool_size=1)
    client = RawClient(router.port)
    client.login_trust()
    from router.protocol import messages as m

    client.send(m.query("BEGIN; INSERT INTO dead_client VALUES ('uncommitted'); SELECT pg_backend_pid()"))
    replies = client.recv_until(b"Z")
    assert replies[-1] == (b"Z", b"T")
    dead_pid = int([body for t, body in replies if t == b"D"][0][6:])
    client.close()  # no Terminate, in the middle of the transaction

    with psycopg.connect(router.dsn("carol"), autocommit=True) as nxt:
        pid, xact = nxt.execute("SELECT pg_backend_pid(), pg_current_xact_id_if_assigned()").fetchone()
        assert pid == dead_pid  # the very same server connection (pool of one)
        assert xact is None
        assert nxt.execute("SELECT count(*) FROM dead_client").fetchone() == (0,)
        nxt.execute("BEGIN")  # would warn "already a transaction in progress" otherwise
        assert nxt.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        nxt.execute("ROLLBACK")
    assert cluster.psql("SELECT count(*) FROM dead_client", dbname="app") == "0"


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_idle_transaction_timeout_disconnects_the_idle_client(start_router, cluster, pool_mode):
    """idle_transaction_timeout: a client holding a server connection inside a transaction and
    sending nothing is disconnected with FATAL 25P03, and its transaction is rolled back. A
    client that keeps talking inside its transaction, or one idle outside a transaction (in
    session mode, holding its server connection), stays."""
    cluster.psql("CREATE TABLE IF NOT EXISTS idle_tx (marker text)", dbname="app")
    router = start_router(pool_size=3, pool_mode=pool_mode, idle_transaction_timeout=1.0)
    busy = psycopg.connect(router.dsn("carol"), autocommit=True)
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    idle = psycopg.connect(router.dsn("carol"), autocommit=True)
    idle.execute("SELECT 1")
    victim = psycopg.connect(router.dsn("carol"), autocommit=True)
    victim.execute("BEGIN")
    victim.execute("INSERT INTO idle_tx VALUES ('uncommitted')")
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    quiet_since = time.monotonic()
    # Until the router speaks to the victim, the busy client sends a statement every 0.2 s.
    while not select.select([victim.fileno()], [], [], 0.2)[0]:
        assert time.monotonic() - quiet_since < 10, "the idle client was never disconnected"
        busy.execute("SELECT 1")
    assert time.monotonic() - quiet_since >= 1.0, "disconnected before idle_transaction_timeout"
    with pytest.raises(errors.IdleInTransactionSessionTimeout, match="idle-in-transaction timeout"):
        victim.execute("SELECT 1")  # 25P03
    assert victim.info.status == psycopg.pq.ConnStatus.BAD
    assert busy.execute("SELECT 2").fetchone() == (2,)
    busy.execute("COMMIT")
    assert idle.execute("SELECT 3").fetchone() == (3,)
    deadline = time.monotonic() + 10
    while cluster.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {pid}") != "idle":
        assert time.monotonic() < deadline, "the victim's server connection was not rolled back"
        time.sleep(0.05)
    assert cluster.psql("SELECT count(*) FROM idle_tx", dbname="app") == "0"
    for conn in (busy, idle, victim):
        conn.close()


def test_idle_transaction_timeout_spares_a_portal_fetched_in_parts(start_router):
    """A client fetching a portal a row at a time (Execute with a row limit, then Flush) sends
    no Sync for longer than idle_transaction_timeout, but it is not idle: it stays."""
    router = start_router(idle_transaction_timeout=1.0)
    client = RawClient(router.port)
    client.login_trust()
    client.send(m.query("BEGIN"))
    assert client.recv_until(b"Z")[-1] == (b"Z", b"T")
    one_row = frame(b"E", b"\0" + (1).to_bytes(4, "big")) + frame(b"H")
    client.send(frame(b"P", b"\0SELECT generate_series(1, 1000)\0\0\0") + frame(b"B", b"\0\0" + b"\0" * 6) + one_row)
    rows = 0
    started = time.monotonic()
    while time.monotonic() - started < 3.0:  # three janitor passes past the timeout
        replies = client.recv_until(b"s")  # PortalSuspended
        rows += sum(t == b"D" for t, _ in replies)
        time.sleep(0.2)  # the client's own pace, well under the timeout
        client.send(one_row)
    client.send(m.sync())
    replies = client.recv_until(b"Z")
    assert replies[-1] == (b"Z", b"T"), replies
    client.send(m.query("COMMIT"))
    assert client.recv_until(b"Z")[-1] == (b"Z", b"I")
    assert rows >= 10
    client.close()


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_client_idle_timeout_disconnects_the_idle_client(start_router, pool_mode):
    """client_idle_timeout: a client idle outside any transaction for longer is disconnected
    with FATAL 57P05, and a server connection it held (session mode) goes back to the pool. A
    client that keeps talking, and one idle inside a transaction, stay."""
    router = start_router(pool_size=3, pool_mode=pool_mode, client_idle_timeout=1.0)
    busy = psycopg.connect(router.dsn("carol"), autocommit=True)
    in_tx = psycopg.connect(router.dsn("carol"), autocommit=True)
    in_tx.execute("BEGIN")
    in_tx.execute("SELECT 1")
    victim = psycopg.connect(router.dsn("carol"), autocommit=True)
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    quiet_since = time.monotonic()
    # Until the router speaks to the victim, the busy client sends a statement every 0.2 s.
    while not select.select([victim.fileno()], [], [], 0.2)[0]:
        assert time.monotonic() - quiet_since < 10, "the idle client was never disconnected"
        busy.execute("SELECT 1")
    assert time.monotonic() - quiet_since >= 1.0, "disconnected before client_idle_timeout"
    with pytest.raises(errors.IdleSessionTimeout, match="idle-session timeout"):
        victim.execute("SELECT 1")  # 57P05
    assert victim.info.status == psycopg.pq.ConnStatus.BAD
    assert busy.execute("SELECT 2").fetchone() == (2,)
    assert in_tx.execute("SELECT 3").fetchone() == (3,)
    in_tx.execute("COMMIT")
    # The victim's server connection is idle in its pool again, not lost or left linked.
    deadline = time.monotonic() + 10
    while pid not in router.call(lambda r: {s.backend_pid for p in r.pools.pools.values() for s in p.idle}):
        assert time.monotonic() < deadline, "the idle client's server connection never came back"
        time.sleep(0.05)
    for conn in (busy, in_tx, victim):
        conn.close()


def test_query_timeout_cancels_the_query_and_disconnects(start_router, cluster):
    """query_timeout: a query whose ReadyForQuery has not come back after that long is
    cancelled on its server (PostgreSQL stops running it), its server connection closed (not
    returned to the pool) and the client disconnected with FATAL 57014. Each query of a
    pipeline has the whole timeout; a client idle in a transaction owes nothing and stays."""
    router = start_router(pool_size=3, query_timeout=1.0)
    in_tx = psycopg.connect(router.dsn("carol"), autocommit=True)
    in_tx.execute("BEGIN")
    in_tx.execute("SELECT 1")
    steady = RawClient(router.port)
    steady.login_trust()
    started = time.monotonic()
    steady.send(m.query("SELECT pg_sleep(0.4)") * 5)  # pipelined: replies owed for 2 s
    for _ in range(5):
        replies = steady.recv_until(b"Z")
        assert [t for t, _ in replies] == [b"T", b"D", b"C", b"Z"], replies
    assert time.monotonic() - started >= 2.0
    steady.close()
    victim = psycopg.connect(router.dsn("carol"), autocommit=True)
    outcome: list[BaseException] = []

    def run_victim() -> None:
        try:
            victim.execute("SELECT pg_sleep(60) /* query_timeout victim */")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run_victim)
    started = time.monotonic()
    thread.start()
    sql = "SELECT pid FROM pg_stat_activity WHERE query LIKE '%query_timeout victim%' AND pid <> pg_backend_pid()"
    pid = ""
    while not pid:
        assert time.monotonic() - started < 10, "the victim's query never started"
        pid = cluster.psql(sql)
    thread.join(timeout=15)
    assert not thread.is_alive(), "query_timeout never ended the query"
    assert 1.0 <= time.monotonic() - started, "ended before query_timeout"
    assert len(outcome) == 1 and isinstance(outcome[0], errors.QueryCanceled), outcome
    assert "query_timeout" in str(outcome[0])
    assert victim.info.status == psycopg.pq.ConnStatus.BAD
    assert int(pid) not in server_pids(router)
    # Cancelled, not left to sleep out its minute: the backend is gone well before.
    deadline = time.monotonic() + 10
    while cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") != "0":
        assert time.monotonic() < deadline, "the timed-out query kept running on the server"
        time.sleep(0.05)
    assert in_tx.execute("SELECT 2").fetchone() == (2,)
    in_tx.execute("COMMIT")
    for conn in (in_tx, victim):
        conn.close()


def _capped_router(start_router, **overrides):
    """Database app pooled as two server users (two pools), with max_db_connections 2."""
    return start_router(
        pool_size=3,
        max_db_connections=2,
        databases={
            "app": {"cluster": "main", "server_user": "postgres"},
            "app_t": {"cluster": "main", "dbname": "app", "server_user": "pgr_trust"},
        },
        **overrides,
    )


def _held(router) -> list[tuple[int, int, int]]:
    """(servers + connecting, idle, waiting) of each pool, sorted."""
    return router.call(
        lambda r: sorted((len(p.servers) + p.connecting, len(p.idle), len(p.waiters)) for p in r.pools.pools.values())
    )


def poll(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_max_db_connections_caps_the_pools_of_a_database_together(start_router, cluster):
    """max_db_connections: the pools of one database (here two server users) hold at most
    that many server connections together, whatever pool_size allows. A pool at the cap
    takes a sibling's idle connection at once, and a connection released while a sibling's
    client waits goes to that sibling; a client that waits too long gets 53300 naming the cap."""
    router = _capped_router(start_router, query_wait_timeout=2.0, admin_console_users=["alice"])

    def held() -> list[tuple[int, int, int]]:
        return _held(router)

    a1 = psycopg.connect(router.dsn("carol", dbname="app"), autocommit=True)
    a2 = psycopg.connect(router.dsn("carol", dbname="app"), autocommit=True)
    b = psycopg.connect(router.dsn("carol", dbname="app_t"), autocommit=True)
    for conn in (a1, a2):
        conn.execute("BEGIN")
        conn.execute("SELECT 1")  # both of the cap's connections, in pool app/postgres
    got: list = []
    thread = threading.Thread(target=lambda: got.append(b.execute("SELECT current_user").fetchone()))
    thread.start()
    poll(lambda: held() == [(0, 0, 1), (2, 0, 0)], f"pool app_t should wait at the cap: {held()}")
    a1.execute("COMMIT")  # released while app_t's client waits: the slot goes there
    thread.join(timeout=10)
    assert got == [("pgr_trust",)]
    assert sum(n for n, _, _ in held()) <= 2
    a2.execute("COMMIT")  # idle now, nobody waiting: stays open
    poll(lambda: held() == [(1, 1, 0), (1, 1, 0)], f"one idle connection each: {held()}")
    c = psycopg.connect(router.dsn("carol", dbname="app_t"), autocommit=True)
    d = psycopg.connect(router.dsn("carol", dbname="app_t"), autocommit=True)
    for conn in (c, d):  # the second takes app/postgres's idle slot, not waiting for a release
        conn.execute("BEGIN")
        assert conn.execute("SELECT current_user").fetchone() == ("pgr_trust",)
    assert held() == [(0, 0, 0), (2, 0, 0)]
    columns, pools = router.call(lambda r: worker_rows(r, "SHOW POOLS"))  # the console's table
    assert {row[columns.index("caps")] for row in pools} == {"max_db_connections 2/2"}
    statuses = router.call(lambda r: r.status())["pools"].values()  # GET /pools
    assert [(s["max_db_connections"], s["max_db_connections_used"]) for s in statuses] == [(2, 2), (2, 2)]
    # The entries share the real database but not the server user: SHOW DATABASES counts
    # (and KILL, RECONNECT close) each one's own pool.
    with psycopg.connect(router.dsn("alice", "alice-pw", "pgrouter"), autocommit=True) as console:
        current = {row[0]: row[9] for row in console.execute("SHOW DATABASES").fetchall()}
    assert current == {"app": "0", "app_t": "2"}
    e = psycopg.connect(router.dsn("carol", dbname="app"), autocommit=True)
    with pytest.raises(errors.TooManyConnections) as exc:
        e.execute("SELECT 1")
    assert "max_db_connections (2) reached for database app" in (exc.value.diag.message_detail or "")
    for conn in (c, d):
        conn.execute("COMMIT")
    assert e.execute("SELECT 2").fetchone() == (2,)  # the client stays, and gets in now
    assert sum(n for n, _, _ in held()) <= 2
    for conn in (a1, a2, b, c, d, e):
        conn.close()


def test_max_db_connections_serves_the_longest_waiting_client_first(start_router):
    """At the cap, a released connection goes to whichever pool's client has waited longest:
    the pool's own (the connection stays, warm) when that one queued first."""
    router = _capped_router(start_router)
    a1, a2, x, y = (psycopg.connect(router.dsn("carol", dbname=db), autocommit=True) for db in ("app", "app", "app", "app_t"))
    for conn in (a1, a2):
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
    done: dict[str, tuple] = {}

    def run(name: str, conn, *statements: str) -> threading.Thread:
        def target() -> None:
            for sql in statements:
                conn.execute(sql)
            done[name] = conn.execute("SELECT current_user").fetchone()

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    x_thread = run("x", x, "BEGIN")  # x keeps its connection once it has one
    poll(lambda: _held(router) == [(0, 0, 0), (2, 0, 1)], f"x should wait first: {_held(router)}")
    y_thread = run("y", y)
    poll(lambda: _held(router) == [(0, 0, 1), (2, 0, 1)], f"then y: {_held(router)}")
    a1.execute("COMMIT")
    x_thread.join(timeout=5)
    assert done == {"x": ("postgres",)}, "the client that queued first should have been served"
    assert _held(router) == [(0, 0, 1), (2, 0, 0)]  # y still waits: no connection was closed
    a2.execute("COMMIT")
    y_thread.join(timeout=5)
    assert done["y"] == ("pgr_trust",)
    x.execute("COMMIT")
    for conn in (a1, a2, x, y):
        conn.close()


def test_max_user_connections_caps_the_pools_of_a_server_user_together(start_router):
    """max_user_connections: the same, for the pools of one server user over databases."""
    router = start_router(
        pool_size=3,
        max_user_connections=1,
        query_wait_timeout=1.0,
        databases={
            "app": {"cluster": "main", "server_user": "postgres"},
            "pg": {"cluster": "main", "dbname": "postgres", "server_user": "postgres"},
        },
    )
    holder = psycopg.connect(router.dsn("carol", dbname="app"), autocommit=True)
    other = psycopg.connect(router.dsn("carol", dbname="pg"), autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    with pytest.raises(errors.TooManyConnections) as exc:
        other.execute("SELECT current_database()")
    assert "max_user_connections (1) reached for user postgres" in (exc.value.diag.message_detail or "")
    holder.execute("COMMIT")  # idle now: taken from its pool for the other database
    assert other.execute("SELECT current_database()").fetchone() == ("postgres",)
    assert sum(n for n, _, _ in _held(router)) == 1
    holder.close()
    other.close()


def test_a_database_s_own_max_db_connections(start_router):
    """A [databases] entry's max_db_connections caps its pools with no global cap set."""
    router = start_router(
        pool_size=3,
        query_wait_timeout=1.0,
        databases={"app": {"cluster": "main", "server_user": "postgres", "max_db_connections": 1}},
    )
    holder = psycopg.connect(router.dsn("carol"), autocommit=True)
    other = psycopg.connect(router.dsn("carol"), autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    with pytest.raises(errors.TooManyConnections) as exc:
        other.execute("SELECT 1")
    assert "max_db_connections (1) reached for database app" in (exc.value.diag.message_detail or "")
    holder.execute("COMMIT")
    assert other.execute("SELECT 2").fetchone() == (2,)
    holder.close()
    other.close()


def test_a_reload_raises_lowers_and_removes_max_db_connections(start_router, cluster):
    """max_db_connections changes with a reload, as with PgBouncer's RELOAD: raised, a client
    waiting at the cap gets a connection at once (no release needed); lowered below what the
    pools hold, idle connections close now and busy ones as they come back; 0 removes the cap.
    A raised pool_size likewise serves a waiting client at once."""
    from router.config import Settings

    databases = {
        "app": {"cluster": "main", "server_user": "postgres"},
        "app_t": {"cluster": "main", "dbname": "app", "server_user": "pgr_trust"},
    }
    router = _capped_router(start_router, query_wait_timeout=30.0)

    def reload(**overrides) -> list[str]:
        config = router_config(cluster, pool_size=3, max_db_connections=2, databases=databases, query_wait_timeout=30.0)
        return router.call(lambda r: r.reload(Settings(**{**config, **overrides})))["applied"]

    def wait_in(conn, name: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: got.setdefault(name, conn.execute("SELECT current_user").fetchone()))
        thread.start()
        return thread

    got: dict[str, tuple] = {}
    a1, a2, a3, b = (psycopg.connect(router.dsn("carol", dbname=db), autocommit=True) for db in ("app", "app", "app", "app_t"))
    for conn in (a1, a2):
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
    waiting = wait_in(b, "b")
    poll(lambda: _held(router) == [(0, 0, 1), (2, 0, 0)], f"app_t should wait at the cap: {_held(router)}")
    assert "max_db_connections" in reload(max_db_connections=3)
    waiting.join(timeout=10)
    assert got == {"b": ("pgr_trust",)}, "the raised cap should have let the waiting client in"
    assert _held(router) == [(1, 1, 0), (2, 0, 0)]

    reload(max_db_connections=1)  # 3 held: app_t's idle one closes now, app's busy ones later
    assert _held(router) == [(0, 0, 0), (2, 0, 0)]
    a1.execute("COMMIT")  # comes back over the cap: closed
    poll(lambda: _held(router) == [(0, 0, 0), (1, 0, 0)], f"a1's connection should close: {_held(router)}")
    a2.execute("COMMIT")  # at the cap now: kept
    assert _held(router) == [(0, 0, 0), (1, 1, 0)]
    a1.execute("BEGIN")
    a1.execute("SELECT 1")
    waiting = wait_in(a2, "a2")
    poll(lambda: _held(router) == [(0, 0, 0), (1, 0, 1)], f"a2 should wait at the lowered cap: {_held(router)}")
    reload(max_db_connections=0)  # no cap: pool_size 3 is the limit
    waiting.join(timeout=10)
    assert got["a2"] == ("postgres",)
    assert router.call(lambda r: r.pools.caps) == {}

    reload(max_db_connections=0, pool_size=2)
    a2.execute("BEGIN")
    a2.execute("SELECT 1")
    waiting = wait_in(a3, "a3")
    poll(lambda: _held(router) == [(0, 0, 0), (2, 0, 1)], f"a3 should wait at pool_size 2: {_held(router)}")
    reload(max_db_connections=0, pool_size=3)
    waiting.join(timeout=10)
    assert got["a3"] == ("postgres",), "the raised pool_size should have let the waiting client in"
    for conn in (a1, a2, a3, b):
        conn.close()


def _pool_row(router) -> dict:
    """The console's SHOW POOLS row of the (only) pool, by column."""
    columns, rows = router.call(lambda r: worker_rows(r, "SHOW POOLS"))
    assert len(rows) == 1
    return dict(zip(columns, rows[0], strict=True))


def test_reserve_pool_serves_a_client_that_waited(start_router):
    """reserve_pool_size: a client that has waited reserve_pool_timeout for a full pool gets a
    connection beyond pool_size, up to the reserve; another waits and may time out (53300).
    The reserve connection is closed when it comes back with nobody waiting."""
    router = start_router(pool_size=1, reserve_pool_size=1, reserve_pool_timeout=0.2, query_wait_timeout=1.5)
    holder = psycopg.connect(router.dsn("carol"), autocommit=True)
    second = psycopg.connect(router.dsn("carol"), autocommit=True)
    third = psycopg.connect(router.dsn("carol"), autocommit=True)
    holder.execute("BEGIN")
    first_pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
    second.execute("BEGIN")
    second_pid = second.execute("SELECT pg_backend_pid()").fetchone()[0]  # waits, then the reserve
    assert second_pid != first_pid
    assert server_pids(router) == {first_pid, second_pid}
    row = _pool_row(router)
    assert (row["size"], row["servers"], row["reserve"]) == (1, 2, "1/1")
    with pytest.raises(errors.TooManyConnections):
        third.execute("SELECT 1")  # pool and reserve both in transactions: no third connection
    assert router.call(lambda r: next(iter(r.status()["pools"].values()))["reserve_opened"]) == 1
    registry = router.call(metrics_registry)
    text = router.call(lambda r: generate_latest(registry).decode())
    assert [s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "pgrouter_pool_reserve_opened_total"] == [1]  # fmt: skip
    holder.execute("COMMIT")  # nobody waits: the pool is above its size, so this one closes
    poll(lambda: server_pids(router) == {second_pid}, "the connection beyond pool_size closed")
    second.execute("COMMIT")  # back to the pool's size: kept
    assert third.execute("SELECT pg_backend_pid()").fetchone() == (second_pid,)
    assert _pool_row(router)["reserve"] == "0/1"
    for conn in (holder, second, third):
        conn.close()


def test_reserve_pool_waits_for_its_timeout(start_router):
    """Before reserve_pool_timeout a waiting client gets no reserve connection: here it times
    out first (query_wait_timeout) with 53300, as without a reserve, though the pool's janitor
    (once a second) looked at it on the way."""
    router = start_router(pool_size=1, reserve_pool_size=1, reserve_pool_timeout=30, query_wait_timeout=2.5)
    holder = psycopg.connect(router.dsn("carol"), autocommit=True)
    other = psycopg.connect(router.dsn("carol"), autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    with pytest.raises(errors.TooManyConnections):
        other.execute("SELECT 1")
    assert len(server_pids(router)) == 1
    holder.close()
    other.close()


def test_reload_keeps_each_pool_s_own_size(start_router, cluster):
    """A reload applies the global pool settings to existing pools, but a pool made for a
    [databases] entry with its own pool_size or query_wait_timeout keeps them."""
    from router.config import Settings
    from tests.conftest import router_config

    overrides = {
        "pool_size": 5,
        "databases": {"app": {"cluster": "main", "server_user": "postgres", "pool_size": 2, "query_wait_timeout": 7}},
    }
    router = start_router(**overrides)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SELECT 1")
    changed = Settings(**router_config(cluster, **overrides, reserve_pool_size=3, server_idle_timeout=60))
    applied = router.call(lambda r: r.reload(changed))["applied"]
    assert [name for name in applied if name != "users"] == ["reserve_pool_size", "server_idle_timeout"]
    settings = router.call(lambda r: [p.settings for p in r.pools.pools.values()])
    assert [(s.size, s.query_wait_timeout, s.reserve_size, s.idle_timeout) for s in settings] == [(2, 7, 3, 60)]


def test_reload_lowering_pool_size_shrinks_a_busy_pool(start_router, cluster):
    """A reload that lowers pool_size below what a pool holds: connections coming back while
    clients wait are closed until the pool is down to its new size (none is handed on beyond
    it), and only then serve the waiters; nothing is lost on the way."""
    from router.config import Settings

    router = start_router(pool_size=3, query_wait_timeout=20)
    holders = [psycopg.connect(router.dsn("carol"), autocommit=True) for _ in range(3)]
    pids = []
    for conn in holders:
        conn.execute("BEGIN")
        pids.append(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    assert server_pids(router) == set(pids)
    router.call(lambda r: r.reload(Settings(**router_config(cluster, pool_size=1, query_wait_timeout=20))))
    results: list[int] = []

    def wait_and_query(i: int) -> None:
        with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
            results.append(conn.execute("SELECT pg_backend_pid() * 0 + %s::int", (i,)).fetchone()[0])

    threads = [threading.Thread(target=wait_and_query, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    waiting = lambda r: sum(p.stats()["waiting"] for p in r.pools.pools.values())  # noqa: E731
    router.wait_for(lambda r: waiting(r) == 2, what="2 waiters")
    holders[0].execute("COMMIT")  # 3 open, size 1: closed, not handed on
    poll(lambda: server_pids(router) == set(pids[1:]), "the first connection back closed")
    assert router.call(waiting) == 2
    holders[1].execute("COMMIT")  # 2 open: closed as well
    poll(lambda: server_pids(router) == {pids[2]}, "the second connection back closed")
    assert router.call(waiting) == 2 and results == []
    holders[2].execute("COMMIT")  # at the new size: it serves the waiters, one after the other
    for t in threads:
        t.join(10)
    assert sorted(results) == [0, 1]
    assert server_pids(router) == {pids[2]}
    for conn in holders:
        conn.close()


def test_reload_lowering_pool_size_closes_idle_connections_beyond_it(start_router, cluster):
    """Idle connections above a pool_size a reload lowered close within a janitor round, the
    most recently used one kept; the pool serves on at its new size."""
    from router.config import Settings

    router = start_router(pool_size=3, server_idle_timeout=0)
    conns = [psycopg.connect(router.dsn("carol"), autocommit=True) for _ in range(3)]
    for conn in conns:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
    for conn in conns:
        conn.execute("COMMIT")
    assert len(server_pids(router)) == 3
    last = router.call(lambda r: next(iter(r.pools.pools.values())).idle[-1].backend_pid)
    router.call(lambda r: r.reload(Settings(**router_config(cluster, pool_size=1, server_idle_timeout=0))))
    poll(lambda: server_pids(router) == {last}, "idle connections beyond the lowered pool_size closed")
    assert [c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in conns] == [last] * 3
    for conn in conns:
        conn.close()


def _keepalive(transport) -> tuple[int, int, int, int]:
    sock = transport.get_extra_info("socket")
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


@pytest.mark.parametrize("keepalive", [True, False])
def test_tcp_keepalive_on_client_and_server_sockets(start_router, keepalive):
    """tcp_keepalive and its timings are set on both sides' sockets (read back from the
    kernel), so a peer gone without a FIN or RST is noticed; off when turned off."""
    router = start_router(tcp_keepalive=keepalive, tcp_keepidle=30, tcp_keepintvl=5, tcp_keepcnt=3)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")  # holds its server connection
        sides = router.call(
            lambda r: (
                [_keepalive(c.transport) for c in r.clients.values()],
                [_keepalive(s.transport) for p in r.pools.pools.values() for s in p.servers],
            )
        )
        conn.execute("COMMIT")
    clients, servers = sides
    assert len(clients) == 1 and servers
    for options in clients + servers:
        if keepalive:
            assert options == (1, 30, 5, 3)
        else:
            assert options[0] == 0


@pytest.mark.parametrize("on", [True, False])
def test_log_connections_and_disconnections(start_router, caplog, on):
    """log_connections / log_disconnections: one INFO line per login and per logged-in client
    leaving; nothing at INFO when off (the default)."""
    router = start_router(log_connections=on, log_disconnections=on)
    caplog.set_level(logging.INFO, logger="pgrouter.client")
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    client_lines = lambda: [r.getMessage() for r in caplog.records if r.name == "pgrouter.client"]  # noqa: E731
    if not on:
        router.wait_for(lambda r: r.client_count == 0, what="the client gone")
        assert client_lines() == []
        return
    deadline = time.monotonic() + 10
    while not any("disconnected after" in line for line in client_lines()):
        assert time.monotonic() < deadline, f"no disconnection line: {client_lines()}"
        time.sleep(0.02)
    login, leave = client_lines()
    assert login.startswith("client carol@127.0.0.1:") and login.endswith("/app logged in: tenant -, no TLS, transaction pooling")
    assert leave.startswith("client carol@127.0.0.1:") and "/app disconnected after " in leave


def test_client_disconnecting_mid_query_closes_that_server(start_router):
    router = start_router(pool_size=1)
    client = RawClient(router.port)
    client.login_trust()
    from router.protocol import messages as m

    client.send(m.query("SELECT pg_backend_pid(), pg_sleep(30)"))
    router.wait_for(lambda r: any(s.pending for p in r.pools.pools.values() for s in p.servers), what="query running")
    pid = next(iter(server_pids(router)))
    client.close()
    router.wait_for(lambda r: pid not in {s.backend_pid for p in r.pools.pools.values() for s in p.servers}, what="server closed")
    with psycopg.connect(router.dsn("carol"), autocommit=True) as nxt:
        assert nxt.execute("SELECT 1").fetchone() == (1,)


def test_session_mode_keeps_server_and_resets_it(start_router):
    router = start_router(pool_mode="session", pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SET search_path = pg_catalog")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert conn.execute("SHOW search_path").fetchone() == ("pg_catalog",)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    with psycopg.connect(router.dsn("carol"), autocommit=True) as nxt:
        assert nxt.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert nxt.execute("SHOW search_path").fetchone() == ('"$user", public',)


def test_entries_of_one_real_database_in_two_pool_modes_get_a_pool_each(start_router):
    """A session-mode entry and a transaction-mode entry of the same real database and
    server user: each client gets the mode of the entry it asked for, whichever logged in
    first (a shared pool would give both the first one's mode)."""
    router = start_router(
        pool_size=1,
        query_wait_timeout=0.5,
        databases={
            "app": {"cluster": "main", "server_user": "postgres"},
            "app_session": {"cluster": "main", "dbname": "app", "server_user": "postgres", "pool_mode": "session"},
        },
    )
    with (
        psycopg.connect(router.dsn("carol", dbname="app_session"), autocommit=True) as session,
        psycopg.connect(router.dsn("carol"), autocommit=True) as one,
        psycopg.connect(router.dsn("carol"), autocommit=True) as two,
    ):
        pid = session.execute("SELECT pg_backend_pid()").fetchone()[0]  # kept: session mode
        # Transaction mode: the two take turns on one server connection, not the session's.
        for i in range(3):
            assert one.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
            assert two.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        assert session.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
        modes = router.call(lambda r: sorted((p.key.dbname, p.settings.mode.value) for p in r.pools.pools.values()))
        assert modes == [("app", "session"), ("app", "transaction")]



def test_a_session_client_leaving_as_its_server_dies_logs_no_failure(start_router, caplog):
    """A departing client's server connection is reset (here: ROLLBACK) before it is pooled
    again. When both ends drop in the same loop turn, the client's first, the reset finds
    the server connection closed: a lost connection like any other, not a failure of the
    router (it used to write to the closed transport and log a traceback)."""
    caplog.set_level(logging.ERROR)
    router = start_router(pool_mode="session", pool_size=2)
    leaving = psycopg.connect(router.dsn("carol"), autocommit=True)
    leaving.execute("BEGIN")
    leaving.execute("SELECT 1")

    def both_ends_drop(r) -> None:
        (client,) = r.clients.values()
        server = client.server
        client.transport.abort()  # connection_lost comes later in this turn, in this order
        server.transport.abort()

    router.call(both_ends_drop)
    router.wait_for(lambda r: not r.clients and not r._tasks and not any(p.servers for p in r.pools.pools.values()),
                    what="the client gone, the reset over and its server connection forgotten")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
        assert other.execute("SELECT 1").fetchone() == (1,)
    leaving.close()



def test_each_waiter_gets_its_own_connect_attempt(start_router, cluster):
    """A failed attempt to open a server connection fails the oldest waiter with its reason;
    the clients queued behind it get attempts of their own, and their own answers, rather
    than waiting out query_wait_timeout with no attempt under way. (They did when the
    attempt was refused outright: after a primary went down, its pool's queue timed out with
    53300 long after the failover.) The router reaches the primary through its Unix socket,
    which is moved away to refuse connections."""
    primary = cluster.primary
    router = start_router(
        clusters={"main": {"primary": {"host": str(primary.socket_dir), "port": primary.port}}},
        pool_size=1,
        query_wait_timeout=8,
    )
    clients = [RawClient(router.port) for _ in range(2)]
    for client in clients:
        client.login_trust()
        client.send(m.query("SELECT 1"))
        client.recv_until(b"Z")
    (pid,) = server_pids(router)
    cluster.psql(f"SELECT pg_terminate_backend({pid})")
    router.wait_for(lambda r: not any(p.servers for p in r.pools.pools.values()), what="the server connection gone")
    socket_file = primary.socket_dir / f".s.PGSQL.{primary.port}"
    away = socket_file.with_name(socket_file.name + ".away")
    socket_file.rename(away)
    try:
        # Both queries read in one loop turn: the first starts the only attempt the pool
        # has room for, the second queues behind it.
        stalled, resume = threading.Event(), threading.Event()
        router.loop.call_soon_threadsafe(lambda: (stalled.set(), resume.wait(20)))
        assert stalled.wait(10)
        try:
            for client in clients:
                client.send(m.query("SELECT 2"))
        finally:
            resume.set()
        # Each its own attempt's answer, as when the server refuses a login: FATAL 08006.
        for client in clients:
            fields = client.error_and_close()
            assert (fields["S"], fields["C"]) == ("FATAL", "08006"), fields
            assert "could not connect to server" in fields["M"], fields
            client.close()
    finally:
        away.rename(socket_file)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:  # the server is back
        assert conn.execute("SELECT 3").fetchone() == (3,)
