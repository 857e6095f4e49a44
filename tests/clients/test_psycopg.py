"""psycopg 3, unmodified, through the router: default settings (a transaction opened for you,
commit()/rollback()) and autocommit; simple and extended queries, errors, COPY both ways, a
~100 MB result, notices, LISTEN/NOTIFY (session mode), pipeline mode, many threads on one pool.

Everything committed is checked on the primary directly (`primary` fixture), not through the
router that wrote it.
"""

from __future__ import annotations

import hashlib
import select
import threading
import time

import psycopg
import pytest
from psycopg import errors
from psycopg.pq import TransactionStatus

from tests.clients.conftest import (
    LARGE_DIGEST,
    LARGE_QUERY,
    LARGE_ROWS,
    assert_pool_idle,
    assert_server_free_for_others,
    committed_ids,
)


@pytest.fixture
def conn(router):
    """Default settings: not autocommit, so psycopg sends BEGIN before the first statement."""
    with psycopg.connect(router.dsn("carol")) as conn:
        yield conn


@pytest.fixture
def aconn(router):
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        yield conn


# --- queries and transactions ----------------------------------------------------------


def test_simple_and_extended_queries(aconn):
    cur = aconn.cursor()
    # No parameters: psycopg uses the simple protocol, which alone allows several statements.
    cur.execute("SELECT 'first'; SELECT 'second', 2")
    assert cur.fetchall() == [("first",)]
    assert cur.nextset() and cur.fetchall() == [("second", 2)]
    # Parameters: Parse/Bind/Describe/Execute/Sync, text and binary.
    assert cur.execute("SELECT %s::int + %s, %s::text", (40, 2, "x")).fetchone() == (42, "x")
    cur = aconn.cursor(binary=True)
    assert cur.execute("SELECT %s::bigint * 2, %s::bytea", (21, b"\0\xff")).fetchone() == (42, b"\0\xff")
    # A server-side cursor (DECLARE, then FETCH) inside a transaction.
    with aconn.transaction(), aconn.cursor(name="portal") as named:
        named.execute("SELECT generate_series(1, 1000)")
        assert named.fetchmany(10) == [(i,) for i in range(1, 11)]
        assert sum(row[0] for row in named) == sum(range(11, 1001))


def test_default_settings_commit_and_rollback(router, conn, primary, table):
    conn.execute(f"INSERT INTO {table} VALUES (1, 'rolled back')")
    assert conn.info.transaction_status == TransactionStatus.INTRANS
    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
    conn.rollback()
    conn.execute(f"INSERT INTO {table} VALUES (2, 'committed')")
    assert committed_ids(primary, table) == []  # not before the commit
    conn.commit()
    assert committed_ids(primary, table) == [2]
    with pytest.raises(RuntimeError):
        with conn.transaction():
            conn.execute(f"INSERT INTO {table} VALUES (3, 'block rolled back')")
            raise RuntimeError("leave the block")
    with conn.transaction():
        conn.execute(f"INSERT INTO {table} VALUES (4, 'block committed')")
    assert committed_ids(primary, table) == [2, 4]
    assert_pool_idle(router)


def test_autocommit_commit_and_rollback(router, aconn, primary, table):
    aconn.execute(f"INSERT INTO {table} VALUES (1, 'autocommitted')")
    assert committed_ids(primary, table) == [1]
    aconn.execute("BEGIN")
    aconn.execute(f"INSERT INTO {table} VALUES (2, 'rolled back')")
    aconn.execute("ROLLBACK")
    aconn.execute("BEGIN")
    aconn.execute(f"INSERT INTO {table} VALUES (3, 'committed')")
    aconn.execute("COMMIT")
    assert committed_ids(primary, table) == [1, 3]
    assert_pool_idle(router)


def test_error_inside_transaction(router, conn, primary, table):
    conn.execute(f"INSERT INTO {table} VALUES (1, 'doomed')")
    with pytest.raises(errors.DivisionByZero):
        conn.execute("SELECT 1 / %s", (0,))
    assert conn.info.transaction_status == TransactionStatus.INERROR
    with pytest.raises(errors.InFailedSqlTransaction) as exc:
        conn.execute("SELECT 1")
    assert exc.value.sqlstate == "25P02"
    conn.rollback()
    assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
    conn.commit()
    assert committed_ids(primary, table) == []
    assert_pool_idle(router)


@pytest.mark.parametrize(
    "sql, params, error",
    [
        ("SELEC 1", None, errors.SyntaxError),
        ("SELECT * FROM no_such_table", None, errors.UndefinedTable),
        ("SELECT 1 / %s", (0,), errors.DivisionByZero),
        ("SELECT %s::int", ("x",), errors.InvalidTextRepresentation),
    ],
    ids=["syntax-simple", "undefined-simple", "div0-extended", "bad-param-extended"],
)
def test_error_outside_transaction_leaves_connection_usable(router, aconn, sql, params, error):
    with pytest.raises(error):
        aconn.execute(sql, params)
    assert aconn.info.transaction_status == TransactionStatus.IDLE
    assert aconn.execute("SELECT %s::int", (7,)).fetchone() == (7,)
    assert_pool_idle(router)


# --- COPY ------------------------------------------------------------------------------


def test_copy_from_stdin_and_to_stdout(router, aconn, primary, table):
    rows = [(i, f"row {i} " + "x" * (i % 50)) for i in range(20_000)]
    with aconn.cursor().copy(f"COPY {table} (id, note) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    assert primary.execute(f"SELECT count(*), sum(length(note)) FROM {table}").fetchone() == (
        len(rows), sum(len(note) for _, note in rows))
    with aconn.cursor().copy(f"COPY (SELECT id, note FROM {table} ORDER BY id) TO STDOUT") as copy:
        assert list(copy.rows()) == [(str(i), note) for i, note in rows]
    assert_pool_idle(router)


def test_copy_50mb_both_ways(router, aconn, primary, table):
    rows = 200_000
    sent = "".join(f"{i}\t{f'{i:08x}' * 32}\n" for i in range(rows)).encode()
    assert len(sent) > 50_000_000
    chunk = 1 << 20
    with aconn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
        for start in range(0, len(sent), chunk):
            copy.write(sent[start:start + chunk])
    assert primary.execute(f"SELECT count(*) FROM {table}").fetchone() == (rows,)
    received = hashlib.md5()
    with aconn.cursor().copy(f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT") as copy:
        for data in copy:
            received.update(data)
    assert received.hexdigest() == hashlib.md5(sent).hexdigest()
    assert_pool_idle(router)


def _copy_with_bad_line(conn, table: str) -> None:
    # The bad line comes first; ~8 MB follow, still being sent when the server has answered.
    good = "".join(f"{i}\tfine\n" for i in range(1, 100_001))
    with pytest.raises(errors.InvalidTextRepresentation) as exc:
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            copy.write("oops\tnot a number\n")
            for _ in range(8):
                copy.write(good)
    assert exc.value.sqlstate == "22P02"
    assert 'invalid input syntax for type integer: "oops"' in str(exc.value)


def test_copy_from_bad_data_reports_the_servers_error(router, aconn, primary, table):
    _copy_with_bad_line(aconn, table)
    assert aconn.info.transaction_status == TransactionStatus.IDLE
    assert aconn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    assert committed_ids(primary, table) == []


def test_failed_copy_from_does_not_hold_a_server_connection(start_router, primary, table):
    router = start_router(pool_size=1, query_wait_timeout=2)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        _copy_with_bad_line(conn, table)
        # The client is idle outside any transaction: the only server connection must be
        # free for other clients (PostgreSQL itself drops those trailing messages).
        assert_server_free_for_others(router)


# --- large results, notices, notifications ----------------------------------------------


def test_large_result_checksum(router, aconn):
    expected = aconn.execute(LARGE_DIGEST).fetchone()[0]
    digest = hashlib.md5()
    cur = aconn.cursor()
    cur.execute(LARGE_QUERY)
    size = 0
    for n, (i, text) in enumerate(cur):
        piece = f"{i}:{text}".encode()
        digest.update(b"," + piece if n else piece)
        size += len(piece)
    assert cur.rownumber == LARGE_ROWS
    assert size > 100_000_000
    assert digest.hexdigest() == expected
    assert_pool_idle(router)


@pytest.mark.parametrize("autocommit", [False, True])
def test_notices_reach_the_notice_handler(router, autocommit):
    with psycopg.connect(router.dsn("carol"), autocommit=autocommit) as conn:
        notices: list[tuple[str, str]] = []
        conn.add_notice_handler(lambda diag: notices.append((diag.severity, diag.message_primary)))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from %', 6 * 7; END $$")
        conn.execute("DO $$ BEGIN RAISE WARNING 'careful'; END $$")
        assert notices == [("NOTICE", "hello from 42"), ("WARNING", "careful")]
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_listen_notify_in_session_mode(start_router):
    router = start_router(pool_mode="session")
    with psycopg.connect(router.dsn("carol"), autocommit=True) as listener, \
            psycopg.connect(router.dsn("alice", "alice-pw"), autocommit=True) as notifier:
        listener.execute("LISTEN router_news")
        notifier.execute("NOTIFY router_news, 'first'")
        notifier.execute("SELECT pg_notify('router_news', 'second')")
        # Both arrive while the listener is idle: unsolicited server messages the router
        # must pass on to a session-mode client.
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=2)]
        assert got == [("router_news", "first"), ("router_news", "second")]
        assert listener.execute("SELECT 'still usable'").fetchone() == ("still usable",)


# --- pipeline mode ---------------------------------------------------------------------


def test_pipeline_error_aborts_until_sync(aconn, primary, table):
    cur = aconn.cursor()
    with pytest.raises(errors.DivisionByZero):
        with aconn.pipeline() as pipeline:
            cur.execute(f"INSERT INTO {table} VALUES (%s, 'a')", (1,))
            cur.execute(f"INSERT INTO {table} VALUES (%s, 'b')", (2,))
            pipeline.sync()
            # Autocommit, no BEGIN: everything up to the next Sync is one implicit
            # transaction, and the error discards it all, before and after the failure.
            cur.execute(f"INSERT INTO {table} VALUES (%s, 'c')", (3,))
            aconn.cursor().execute("SELECT 1 / %s", (0,))
            cur.execute(f"INSERT INTO {table} VALUES (%s, 'd')", (4,))
            pipeline.sync()
    assert committed_ids(primary, table) == [1, 2]
    with aconn.pipeline() as pipeline:
        cur.execute(f"INSERT INTO {table} VALUES (%s, 'e') RETURNING id", (5,))
        pipeline.sync()
        assert cur.fetchone() == (5,)
    assert committed_ids(primary, table) == [1, 2, 5]


def test_pipeline_flush_keeps_the_implicit_transaction(aconn):
    # fetchone() before any Sync makes psycopg send Flush: results come back without a
    # ReadyForQuery, and the next statements still run in the same implicit transaction.
    with aconn.pipeline():
        first = aconn.execute("SELECT pg_current_xact_id()::text, pg_backend_pid()")
        xact, pid = first.fetchone()
        second = aconn.execute("SELECT pg_current_xact_id()::text, pg_backend_pid()")
        assert second.fetchone() == (xact, pid)
        third = aconn.execute("SELECT %s::int * 2", (21,))
        assert third.fetchone() == (42,)
    assert aconn.info.transaction_status == TransactionStatus.IDLE
    assert aconn.execute("SELECT pg_current_xact_id()::text").fetchone() != (xact,)


def test_pipeline_does_not_hold_a_server_connection_afterwards(start_router):
    router = start_router(pool_size=1, query_wait_timeout=2)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        with conn.pipeline():
            # Still running when the pipeline block ends, so psycopg sends Sync and then,
            # with a result outstanding, Flush.
            slow = conn.execute("SELECT 'slow', pg_sleep(0.2)")
        assert slow.fetchone() == ("slow", "")
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert_server_free_for_others(router)


# --- many clients, one pool ------------------------------------------------------------


def _hammer(router, queries: int, threads: int, **connect_args) -> tuple[list[str], list]:
    """``threads`` clients, each running ``queries`` parameterised queries (the same query
    text, so with default settings psycopg prepares it after 5 runs); half of them
    autocommit, half with psycopg's default transactions committed after each query."""
    errors_seen: list[str] = []
    wrong: list = []

    def client(n: int) -> None:
        try:
            autocommit = n % 2 == 0
            with psycopg.connect(router.dsn("carol"), autocommit=autocommit, **connect_args) as c:
                for q in range(queries):
                    got = c.execute("SELECT %s::int * 1000 + %s::int", (n, q)).fetchone()
                    if got != (n * 1000 + q,):
                        wrong.append((n, q, got))
                    if not autocommit:
                        c.commit()
        except Exception as exc:  # collected and asserted on by the test thread
            errors_seen.append(f"client {n}: {exc!r}")

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers), "clients still running after 60 s"
    return errors_seen, wrong


def test_32_clients_share_a_pool_of_4(start_router):
    router = start_router(pool_size=4)
    errors_seen, wrong = _hammer(router, queries=100, threads=32)
    assert errors_seen == []
    assert wrong == []
    assert_pool_idle(router)
    [stats] = router.pool_stats().values()
    assert stats["waiting"] == 0 and stats["active"] == 0


def test_32_clients_without_prepared_statements(start_router):
    # prepare_threshold=None: only unnamed statements, never psycopg's _pg3_N ones.
    router = start_router(pool_size=4)
    errors_seen, wrong = _hammer(router, queries=100, threads=32, prepare_threshold=None)
    assert errors_seen == []
    assert wrong == []
    assert_pool_idle(router)


def test_each_client_gets_its_own_prepared_statements_results(start_router):
    """psycopg (default prepare_threshold=5) names its prepared statements _pg3_0, _pg3_1...
    per connection, so two clients use the same names for different queries. Each must get
    its own query's result whichever server connection runs its transaction."""
    router = start_router(pool_size=2)
    with psycopg.connect(router.dsn("carol")) as a, \
            psycopg.connect(router.dsn("carol"), autocommit=True) as b:
        a.execute("SELECT 1")  # a holds one server connection in its open transaction...
        for i in range(6):  # ...while b's query, run 6 times, is prepared on the other one
            assert b.execute("SELECT %s::int + 1000", (i,)).fetchone() == (i + 1000,)
        a.commit()
        for i in range(6):
            assert a.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)
            a.commit()
        for i in range(3):
            assert b.execute("SELECT %s::int + 1000", (i,)).fetchone() == (i + 1000,)


def test_simultaneous_queries_do_not_exceed_pool_size(start_router):
    router = start_router(pool_size=2)
    clients = [psycopg.connect(router.dsn("carol"), autocommit=True) for _ in range(6)]
    try:
        # Hold the router's event loop while all six queries are written, so that it reads
        # them together, as it would under load. (A gate, not a sleep: the loop waits on an
        # Event the test sets once every query is in the router's socket buffers.)
        entered, gate = threading.Event(), threading.Event()
        router.loop.call_soon_threadsafe(lambda: (entered.set(), gate.wait(10)))
        assert entered.wait(10)
        for c in clients:
            c.pgconn.send_query(b"SELECT 42")
            while c.pgconn.flush():
                pass
        gate.set()
        for c in clients:
            assert [r.get_value(0, 0) for r in _results(c.pgconn)] == [b"42"]
        router.wait_for(lambda r: all(p.connecting == 0 for p in r.pools.pools.values()),
                        what="connections being opened to finish")
        [stats] = router.pool_stats().values()
        assert stats["servers"] <= 2, stats
    finally:
        for c in clients:
            c.close()


def _results(pgconn) -> list:
    """The results of the query sent on ``pgconn``. Waits for the socket here, not inside
    libpq's PQgetResult, which would block holding the GIL the in-process router needs."""
    results = []
    deadline = time.monotonic() + 10
    while True:
        pgconn.consume_input()
        if pgconn.is_busy():
            assert time.monotonic() < deadline, "no reply within 10 s"
            select.select([pgconn.socket], [], [], 1)
            continue
        result = pgconn.get_result()
        if result is None:
            return results
        results.append(result)


# --- session mode ----------------------------------------------------------------------


def test_session_mode_default_settings_keep_session_state(start_router, primary, table):
    router = start_router(pool_mode="session", pool_size=2)
    with psycopg.connect(router.dsn("carol")) as conn:
        conn.execute("SET application_name = 'psycopg-session'")
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        conn.commit()
        # Run often enough for psycopg to prepare it server-side: fine with a dedicated server.
        for i in range(10):
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'session')", (i,))
            conn.execute("INSERT INTO scratch VALUES (%s)", (i,))
            conn.commit()
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] >= 1
        assert conn.execute("SELECT sum(x) FROM scratch").fetchone() == (45,)
        assert conn.execute("SHOW application_name").fetchone() == ("psycopg-session",)
        conn.rollback()
    assert committed_ids(primary, table) == list(range(10))
