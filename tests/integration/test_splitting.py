"""Read/write splitting on the shared cluster: where transactions land, seen from the client
(pg_is_in_recovery(), inet_server_port()), with psql, psycopg and asyncpg.

Nothing here pauses, stops or promotes a node; tests that do are in test_splitting_failures.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import asyncpg
import psycopg
import pytest

from router.protocol import messages as m
from tests.cluster import Cluster
from tests.harness import RouterThread
from tests.rawclient import RawClient

WHERE = "SELECT pg_is_in_recovery(), inet_server_port()"
LO_CREAT = 957  # pg_proc oid of lo_creat(integer)


def wait_replicas_eligible(router: RouterThread, count: int = 2) -> None:
    try:
        router.wait_for(
            lambda r: sum(n.eligible for split in r.splits.values() for n in split.topology.nodes) == count,
            what=f"{count} eligible replicas",
        )
    except AssertionError as exc:  # say why not: a failure here is otherwise hard to read
        nodes = router.call(lambda r: [n.as_dict() for split in r.splits.values() for n in split.topology.nodes])
        raise AssertionError(f"{exc}; the monitor sees {nodes}") from None


@pytest.fixture
def split_router(start_router) -> RouterThread:
    router = start_router(split=True)
    wait_replicas_eligible(router)
    return router


def replica_ports(cluster: Cluster) -> set[int]:
    return {r.port for r in cluster.replicas}


def test_psycopg_reads_on_replicas_writes_on_primary(split_router: RouterThread, cluster: Cluster) -> None:
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        ports = Counter()
        for _ in range(200):
            in_recovery, port = conn.execute(WHERE).fetchone()
            assert in_recovery, "a plain read ran on the primary"
            ports[port] += 1
        assert set(ports) == replica_ports(cluster), f"reads did not spread over both replicas: {ports}"
        conn.execute("CREATE TABLE IF NOT EXISTS split_writes (id int, port int)")
        for i in range(50):
            row = conn.execute(
                "INSERT INTO split_writes VALUES (%s, inet_server_port()) RETURNING port, pg_is_in_recovery()",
                (i,),
            ).fetchone()
            assert row == (cluster.primary.port, False)
        with conn.transaction():
            assert conn.execute(WHERE).fetchone() == (False, cluster.primary.port)
        # A read-only transaction runs on a replica, whole.
        conn.execute("BEGIN READ ONLY")
        first = conn.execute(WHERE).fetchone()
        assert conn.execute(WHERE).fetchone() == first
        conn.execute("COMMIT")


def test_psql_split(split_router: RouterThread, cluster: Cluster) -> None:
    script = "\n".join(
        [*(["SELECT inet_server_port();"] * 30),
         "BEGIN READ ONLY;", "SELECT 'ro', pg_is_in_recovery();", "COMMIT;",
         "BEGIN;", "SELECT 'tx', inet_server_port();", "COMMIT;",
         "SET pgrouter.target = primary;", "SELECT 'target', inet_server_port();",
         "RESET pgrouter.target;",
         # A hinted statement counts as a write: later reads wait for replicas to catch up.
         "/* pgrouter: primary */ SELECT 'hint', inet_server_port();"]
    )
    out = subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", split_router.dsn("carol"), "-f", "-"],
        input=script, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    plain = [int(line) for line in out if line.isdigit()]
    assert len(plain) == 30 and set(plain) <= replica_ports(cluster), plain
    assert f"tx|{cluster.primary.port}" in out
    assert f"target|{cluster.primary.port}" in out
    assert f"hint|{cluster.primary.port}" in out
    assert "ro|t" in out
    assert "SET" in out and "RESET" in out


async def test_asyncpg_split(split_router: RouterThread, cluster: Cluster) -> None:
    conn = await asyncpg.connect(split_router.dsn("carol", "x"))
    try:
        ports = Counter()
        for _ in range(100):
            # asyncpg prepares a named statement on whichever node runs it first; the router
            # prepares it again wherever the next transaction lands.
            row = await conn.fetchrow(WHERE)
            assert row[0] is True
            ports[row[1]] += 1
        assert set(ports) == replica_ports(cluster)
        async with conn.transaction():
            assert tuple(await conn.fetchrow(WHERE)) == (False, cluster.primary.port)
        async with conn.transaction(readonly=True):
            assert (await conn.fetchrow(WHERE))[0] is True
    finally:
        await conn.close()


def test_writers_and_locking_go_to_primary(split_router: RouterThread, cluster: Cluster) -> None:
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        # random() is volatile but known not to write: a replica may run it.
        assert conn.execute("SELECT random() >= 0, pg_is_in_recovery()").fetchone() == (True, True)
        conn.execute("CREATE SEQUENCE IF NOT EXISTS split_seq")
        conn.execute("CREATE TABLE IF NOT EXISTS split_locks (id int)")
        assert conn.execute("SELECT nextval('split_seq'), inet_server_port()").fetchone()[1] == cluster.primary.port
        assert conn.execute("SELECT inet_server_port() FROM (SELECT 1) s, split_locks FOR UPDATE").fetchall() == []
        row = conn.execute("SELECT pg_try_advisory_xact_lock(42), inet_server_port()").fetchone()
        assert row == (True, cluster.primary.port)


def test_volatile_user_function_goes_to_primary_stable_to_replica(
    split_router: RouterThread, cluster: Cluster
) -> None:
    cluster.psql(
        "CREATE OR REPLACE FUNCTION split_vol() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';"
        "CREATE OR REPLACE FUNCTION split_stable() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';",
        dbname="app",
    )
    cluster.wait_replay()
    # The catalog is read when the first client of the database arrives.
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        split_router.wait_for(
            lambda r: all(
                r.catalogs.get(route.catalog_key).volatility("split_stable") == "s"
                for route in r.db_routes.values()
            ),
            what="the function catalog to know split_stable",
        )
        for _ in range(20):
            assert conn.execute("SELECT split_stable(), pg_is_in_recovery()").fetchone() == (1, True)
        # A call of a volatile function counts as a write, for read-your-writes too.
        for _ in range(20):
            assert conn.execute("SELECT split_vol(), pg_is_in_recovery()").fetchone() == (1, False)


def test_plain_selects_route_like_any_read(split_router: RouterThread, cluster: Cluster) -> None:
    """A lone plain SELECT (no parentheses, quotes or comments: what pgbench -S sends) takes a
    shortcut past the classifier; what steers a session must still steer it. The view tells
    where each one ran without a function call in the statement itself."""
    cluster.psql("CREATE OR REPLACE VIEW split_whereami AS SELECT inet_server_port() AS port", dbname="app")
    cluster.wait_replay()
    plain = "SELECT port FROM split_whereami;"

    def ports(*lines: str) -> list[int]:
        out = subprocess.run(
            ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", split_router.dsn("carol"), "-f", "-"],
            input="\n".join(lines), capture_output=True, text=True, timeout=60, check=True,
        ).stdout.split()
        return [int(line) for line in out if line.isdigit()]

    reads = ports(*[plain] * 20)
    assert len(reads) == 20 and set(reads) <= replica_ports(cluster), reads
    primary = cluster.primary.port
    assert ports("BEGIN;", plain, "COMMIT;") == [primary]  # conservative: BEGIN runs on the primary
    assert ports("SET pgrouter.target = primary;", plain, plain) == [primary, primary]
    # A session advisory lock pins the client to its (primary) server connection.
    assert ports("SELECT pg_advisory_lock(4711);", plain, "SELECT pg_advisory_unlock(4711);") == [primary]


def test_unnamed_extended_reads_route_like_any_read(split_router: RouterThread, cluster: Cluster) -> None:
    """psycopg without prepared statements sends Parse, Bind, Describe, Execute, Sync, all
    unnamed (so does pgbench -M extended): a lone read of that shape takes the same shortcut
    as a plain SELECT, and what steers a session must still steer it."""
    cluster.psql("CREATE OR REPLACE VIEW split_whereami AS SELECT inet_server_port() AS port", dbname="app")
    cluster.wait_replay()
    plain = "SELECT port FROM split_whereami WHERE %s = 1"
    with psycopg.connect(split_router.dsn("carol"), autocommit=True, prepare_threshold=None) as conn:
        reads = [conn.execute(plain, (1,)).fetchone()[0] for _ in range(20)]
        assert set(reads) <= replica_ports(cluster), reads
        with conn.transaction():
            assert conn.execute(plain, (1,)).fetchone()[0] == cluster.primary.port
        conn.execute("SET pgrouter.target = primary")
        assert conn.execute(plain, (1,)).fetchone()[0] == cluster.primary.port
        conn.execute("SET pgrouter.target = auto")
        conn.execute("SELECT pg_advisory_lock(4712)")
        assert conn.execute(plain, (1,)).fetchone()[0] == cluster.primary.port  # pinned
        conn.execute("SELECT pg_advisory_unlock(4712)")


def test_inlined_constants_are_classified_once(split_router: RouterThread, cluster: Cluster) -> None:
    """A driver that binds parameters on the client side (psycopg's ClientCursor, like psycopg2)
    sends a new text for every value; with every name quoted, as ORMs write them, those texts
    still share one verdict: the parser runs once, and the reads land on replicas. A constant
    that changes the verdict (EXPLAIN ANALYZE 0 or 1) is not shared."""
    cluster.psql('CREATE TABLE IF NOT EXISTS "split_users" ("id" int, "email" text)', dbname="app")
    cluster.wait_replay()
    query = 'SELECT inet_server_port() FROM "split_users" RIGHT JOIN (SELECT 1) AS "one" ON "split_users"."email" = %s AND "split_users"."id" = %s'
    with psycopg.connect(split_router.dsn("carol"), autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute(query, ("first@example.com", 1))
        # Verdicts made before the database's function catalog is read are made again after.
        split_router.wait_for(lambda r: all(r.catalogs.stats(route.catalog_key).loads for route in r.db_routes.values()),
                              what="the function catalog")
        conn.execute(query, ("second@example.com", 2))
        misses = split_router.call(lambda r: r.classifier.misses)
        ports = [conn.execute(query, (f"user{i}@example.com", i)).fetchone()[0] for i in range(30)]
        assert split_router.call(lambda r: r.classifier.misses) == misses, "a new constant cost a parse"
        assert set(ports) <= replica_ports(cluster), ports
        conn.execute('EXPLAIN (ANALYZE 0) DELETE FROM "split_users" WHERE false')
        # Runs the DELETE: on a replica it would fail as a write in a read-only transaction.
        conn.execute('EXPLAIN (ANALYZE 1) DELETE FROM "split_users" WHERE false')


def test_session_target_and_read_only_session(split_router: RouterThread, cluster: Cluster) -> None:
    cluster.psql("CREATE OR REPLACE FUNCTION split_unknown() RETURNS int LANGUAGE sql AS 'SELECT 1'", dbname="app")
    cluster.wait_replay()
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SET pgrouter.target = primary")
        for _ in range(10):
            assert conn.execute(WHERE).fetchone()[0] is False
        conn.execute("SET pgrouter.target = replica")
        # A suspected write (volatile function) follows the session's choice...
        assert conn.execute("SELECT split_unknown(), pg_is_in_recovery()").fetchone() == (1, True)
        conn.execute("SET pgrouter.target = auto")
        assert conn.execute("SELECT split_unknown(), pg_is_in_recovery()").fetchone() == (1, False)
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SET pgrouter.target = sideways")
    # ...and so do the transactions of a read-only session (a new one: the one above called a
    # function that may write, so read-your-writes keeps it on the primary for a moment).
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        with conn.transaction():
            assert conn.execute(WHERE).fetchone()[0] is True
        conn.execute("RESET default_transaction_read_only")
        with conn.transaction():
            assert conn.execute(WHERE).fetchone()[0] is False
    # The setting never reached a server.
    assert cluster.psql("SELECT count(*) FROM pg_settings WHERE name = 'pgrouter.target'") == "0"


@pytest.mark.parametrize("split", [True, False], ids=["split", "no-replicas"])
def test_router_target_wherever_a_server_would_see_it(start_router, cluster: Cluster, split: bool) -> None:
    """SET pgrouter.target inside a transaction (its client holds a server connection), or on
    a database without replicas, reaches a server: as a SET PostgreSQL accepts, never as the
    syntax error `= primary` is there (PRIMARY is a reserved word), and an invalid value fails
    with 22023 as between transactions."""
    router = start_router(split=split)
    if split:
        wait_replicas_eligible(router)
    status = psycopg.pq.TransactionStatus
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("BEGIN")
        assert conn.execute(WHERE).fetchone()[0] is False  # holds a primary connection
        for value in ("primary", "replica", "auto"):
            assert conn.execute(f"SET pgrouter.target = {value}").statusmessage == "SET"
        assert conn.execute("SET SESSION pgrouter.target TO primary").statusmessage == "SET"
        assert conn.execute("RESET pgrouter.target").statusmessage == "RESET"
        assert conn.execute("SET pgrouter.target = primary").statusmessage == "SET"
        assert conn.execute("SELECT 2").fetchone() == (2,)
        conn.execute("COMMIT")
        if split:  # set inside a committed transaction: the session's later reads follow it
            assert conn.execute(WHERE).fetchone()[0] is False
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
            conn.execute("SET pgrouter.target = replica")
            conn.execute("ROLLBACK")  # undoes it, as PostgreSQL undoes a SET
            for _ in range(5):
                assert conn.execute(WHERE).fetchone()[0] is False
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match='"sideways"'):
            conn.execute("SET pgrouter.target = sideways")
        assert conn.info.transaction_status == status.INERROR
        conn.execute("ROLLBACK")
        # What a client puts in the value stays in the value.
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SET pgrouter.target = 'x$pgrouter$; SELECT 1; DO $pgrouter$'")
        conn.execute("ROLLBACK")
        assert conn.execute("SET pgrouter.target = primary").statusmessage == "SET"
        if not split:
            assert conn.execute("SELECT 3").fetchone() == (3,)
        conn.execute("RESET pgrouter.target")


def _placeholder(conn: psycopg.Connection) -> str | None:
    """pgrouter.target as the server connection running this statement has it: None when
    never set there, '' when reset to its default (what the router sends)."""
    return conn.execute("SELECT current_setting('pgrouter.target', true)").fetchone()[0]


def test_router_target_among_other_statements(split_router: RouterThread, cluster: Cluster) -> None:
    """SET pgrouter.target among other statements of one Query, or sent with the extended
    protocol, is the router's setting too: the server gets a placeholder reset in its place,
    never the text (`= primary` would be a syntax error there), and an invalid value fails the
    Query at that statement with 22023, as a server fails an invalid SET."""
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("SET pgrouter.target = primary; SELECT 7")
        assert cur.statusmessage == "SET"
        assert cur.nextset() and cur.fetchone() == (7,)
        for _ in range(5):
            assert conn.execute(WHERE).fetchone()[0] is False
        cur.execute("SELECT 1; /* back */ SET pgrouter.target TO 'auto'")
        for _ in range(5):
            assert conn.execute(WHERE).fetchone()[0] is True
        # In one transaction (one server connection): the server never saw `replica`.
        cur.execute("BEGIN; SELECT 1; SET pgrouter.target = replica; "
                    "SELECT current_setting('pgrouter.target', true); COMMIT")
        for _ in range(3):
            cur.nextset()
        assert cur.fetchone()[0] == ""
        conn.execute("SET pgrouter.target = auto")
        # Fails at that statement: what came before in the Query is rolled back with it, the
        # rest never runs, the session's target stays what it was. (The refusal ran on the
        # primary: read-your-writes may keep the next reads there for a moment.)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match='"sideways"'):
            cur.execute("SET pgrouter.target = primary; SET pgrouter.target = sideways; SELECT 1/0")
        deadline = time.monotonic() + 10
        while not conn.execute(WHERE).fetchone()[0]:
            assert time.monotonic() < deadline, "the failed Query's SET pgrouter.target = primary was kept"
        # Extended protocol: a Parse of it.
        cur.execute("SET pgrouter.target = primary", binary=True)  # Parse/Bind/Execute
        assert cur.statusmessage == "SET"
        for _ in range(5):
            assert conn.execute(WHERE).fetchone()[0] is False
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            cur.execute("SET pgrouter.target = sideways", binary=True)
        conn.execute("RESET pgrouter.target")


async def test_router_target_prepared_by_asyncpg(split_router: RouterThread) -> None:
    """asyncpg sends a fetch() as a named prepared statement: Parse, then Bind/Execute."""
    conn = await asyncpg.connect(split_router.dsn("carol", "x"))
    try:
        await conn.fetch("SET pgrouter.target = primary")
        for _ in range(5):
            assert await conn.fetchval("SELECT pg_is_in_recovery()") is False
        await conn.fetch("SET pgrouter.target = auto")
        for _ in range(5):
            assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
    finally:
        await conn.close()


def test_router_target_in_session_mode(start_router, cluster: Cluster) -> None:
    """Session pooling runs everything on the primary, but a SET pgrouter.target still never
    reaches a server as written (`= primary` is a syntax error there): it becomes a SET of the
    placeholder to its valid value, or fails with 22023. The client keeps its server
    connection, so the server holds the value and SHOW answers it in every form, `auto` before
    any SET (the pool's login value), undone by a rollback, back to `auto` after RESET and
    DISCARD ALL, and never seen by the next client of that connection."""
    router = start_router(split=True, pool_mode="session", pool_size=1)

    def show(conn: psycopg.Connection, **how) -> str:
        return conn.execute("SHOW pgrouter.target", **how).fetchone()[0]

    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        assert show(conn) == show(conn, prepare=True) == "auto"
        for value, seen in (("primary", "primary"), ("replica", "replica"), ("auto", "auto"),
                            ("REPLICA", "replica"), ("DEFAULT", "auto")):
            assert conn.execute(f"SET pgrouter.target = {value}").statusmessage == "SET"
            assert show(conn) == _placeholder(conn) == seen
        cur = conn.cursor()
        cur.execute("SELECT 1; SET SESSION pgrouter.target TO primary; SHOW pgrouter.target")
        assert cur.statusmessage == "SELECT 1" and cur.nextset() and cur.statusmessage == "SET"
        assert cur.nextset() and cur.fetchone() == ("primary",)
        assert conn.execute("RESET pgrouter.target").statusmessage == "RESET"
        assert show(conn) == "auto"
        cur.execute("SET pgrouter.target = replica", binary=True)  # Parse/Bind/Execute
        assert cur.statusmessage == "SET"
        assert show(conn, prepare=True) == "replica"
        with conn.transaction(force_rollback=True):
            conn.execute("SET pgrouter.target = primary")
            assert show(conn) == "primary"
        assert show(conn) == "replica"  # the rollback undid it, as any SET
        with pytest.raises(psycopg.errors.InvalidParameterValue, match='"sideways"'):
            conn.execute("SET pgrouter.target = sideways")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            cur.execute("SET pgrouter.target = sideways", binary=True)
        assert show(conn) == "replica"
        # Only that statement: the text of a string or a function body is the client's.
        assert conn.execute("SELECT 'SET pgrouter.target = primary'").fetchone() == ("SET pgrouter.target = primary",)
        conn.execute("DISCARD ALL")
        assert show(conn) == "auto"
        conn.execute("SET pgrouter.target = primary")
        pid = conn.info.backend_pid
        server_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    # pool_size 1: the next session gets the same server connection, reset for it.
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == server_pid
        assert conn.info.backend_pid != pid
        assert show(conn) == "auto"


@pytest.mark.parametrize("split", [True, False], ids=["split", "no-replicas"])
def test_show_router_target(start_router, cluster: Cluster, split: bool) -> None:
    """A lone SHOW pgrouter.target (a simple Query, transaction mode) is answered by the router
    with the session's target, as a server answers SHOW: no server has the setting (PostgreSQL
    answers 42704 on a connection that never saw it, or '' for the placeholder the router
    sends). Between transactions, in a transaction the router has not sent yet, in one holding
    a server connection; 25P02 in a failed one."""
    router = start_router(split=split)
    status = psycopg.pq.TransactionStatus
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:

        def show() -> str:
            # (prepare=False: psycopg prepares a query it has run 5 times, and the extended
            # protocol's SHOW reaches a server.)
            cur = conn.execute("SHOW pgrouter.target", prepare=False)
            assert cur.statusmessage == "SHOW"
            assert [(d.name, d.type_code) for d in cur.description] == [("pgrouter.target", 25)]
            (row,) = cur.fetchall()
            return row[0]

        assert show() == "auto"
        conn.execute("BEGIN")  # split mode: answered by the router, sent with what follows
        assert show() == "auto"
        assert conn.info.transaction_status == status.INTRANS
        conn.execute("COMMIT")
        conn.execute("SET pgrouter.target = replica")
        assert show() == "replica"
        assert conn.info.transaction_status == status.IDLE
        conn.execute("BEGIN")
        assert show() == "replica"
        assert conn.info.transaction_status == status.INTRANS
        assert conn.execute("SELECT 1").fetchone() == (1,)  # holds a server connection now
        conn.execute("SET pgrouter.target = primary")
        assert show() == "primary"
        assert conn.info.transaction_status == status.INTRANS
        conn.execute("ROLLBACK")  # undoes the SET, as PostgreSQL undoes a SET
        assert show() == "replica"
        assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)  # others reach a server
        # A failed transaction: on a server, and (split mode: a refused pgrouter.target
        # right after the BEGIN the router answered) before reaching one.
        for first, failing, error in (
            ("SELECT 1", "SELECT 1/0", psycopg.errors.DivisionByZero),
            (None, "SET pgrouter.target = nowhere", psycopg.errors.InvalidParameterValue),
        ):
            conn.execute("BEGIN")
            if first:
                conn.execute(first)
            with pytest.raises(error):
                conn.execute(failing)
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("SHOW pgrouter.target", prepare=False)
            assert conn.info.transaction_status == status.INERROR
            conn.execute("ROLLBACK")
            conn.execute("RESET pgrouter.target")
            assert show() == "auto"
    out = subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", router.dsn("carol"), "-c", "  show PGROUTER.TARGET ;",
         "-c", "SET pgrouter.target = primary", "-c", "SHOW pgrouter.target"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()
    assert out == ["auto", "SET", "primary"]


def test_session_routing_survives_errors_and_follows_rollbacks(split_router: RouterThread, cluster: Cluster) -> None:
    """SET pgrouter.target is the router's own: a later failed statement does not undo it. A
    SET default_transaction_read_only that PostgreSQL undoes (its transaction rolled back) no
    longer routes the session's transactions."""
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SET pgrouter.target = primary")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        for _ in range(10):
            assert conn.execute(WHERE).fetchone()[0] is False
        conn.execute("SET pgrouter.target = auto")
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("SET default_transaction_read_only = on")
        conn.execute("ROLLBACK")
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("off",)
        with conn.transaction():  # read-write again: the primary
            assert conn.execute(WHERE).fetchone()[0] is False


@pytest.mark.parametrize("routing", ["conservative", "first_statement"])
def test_a_read_only_sessions_transactions_run_as_postgresql_runs_them(
    start_router, cluster: Cluster, routing: str
) -> None:
    """In a session with default_transaction_read_only on, a plain BEGIN's transaction is
    read-only and runs on a replica, unless it starts with what a read-only transaction may do
    but a standby may not (LISTEN, SET TRANSACTION READ WRITE) or says READ WRITE: those run on
    the primary, so each statement answers as on a dedicated PostgreSQL connection."""
    router = start_router(split=True, transaction_routing=routing)
    wait_replicas_eligible(router)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS split_ro (id int)")
    steps = [
        ["BEGIN", "SELECT pg_is_in_recovery()", "COMMIT"],
        ["BEGIN", "LISTEN split_ro_ch", "COMMIT"],
        ["BEGIN", "SET TRANSACTION READ WRITE", "INSERT INTO split_ro VALUES (1)", "COMMIT"],
        ["BEGIN READ WRITE", "INSERT INTO split_ro VALUES (2)", "COMMIT"],
        ["START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE", "INSERT INTO split_ro VALUES (3)", "COMMIT"],
        ["BEGIN", "INSERT INTO split_ro VALUES (4)", "ROLLBACK"],
        ["BEGIN", "SHOW transaction_read_only", "COMMIT"],
    ]
    for sequence in steps:
        results = []
        for dsn in (router.dsn("carol"), cluster.primary.dsn("app")):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                out = []
                for sql in sequence:
                    try:
                        cur = conn.execute(sql)
                        out.append(cur.statusmessage)
                    except psycopg.Error as exc:
                        out.append(exc.sqlstate)
                results.append(out)
        assert results[0] == results[1], sequence
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = on")
        # Reads still go to replicas: the BEGIN waits for the statement that follows it.
        for _ in range(5):
            with conn.transaction():
                assert conn.execute(WHERE).fetchone()[0] is True


def test_state_taken_on_a_replica_never_stalls_the_session(split_router: RouterThread) -> None:
    """In a read-only transaction on a replica, LISTEN fails (a standby refuses it) and pins
    nothing, so the session's next read-write transaction goes to the primary. An advisory lock
    taken there lives on that replica's backend: the client keeps that server connection, and a
    write then fails with 25006 as on a standby. Neither waits forever (psql's timeout)."""
    script = """
SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY;
BEGIN;
SELECT 'a', pg_is_in_recovery();
LISTEN split_ch;
ROLLBACK;
SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE;
BEGIN;
SELECT 'b', pg_is_in_recovery();
COMMIT;
BEGIN READ ONLY;
SELECT 'c', pg_advisory_lock(4242) IS NOT NULL, pg_is_in_recovery();
COMMIT;
SELECT 'd', pg_is_in_recovery();
CREATE TABLE split_pinned (a int);
SELECT 'e', pg_advisory_unlock(4242), pg_is_in_recovery();
"""
    result = subprocess.run(
        ["psql", "-X", "-At", split_router.dsn("carol"), "-f", "-"],
        input=script, capture_output=True, text=True, timeout=30,
    )
    rows = [line for line in result.stdout.splitlines() if line[:2] in ("a|", "b|", "c|", "d|", "e|")]
    assert rows == ["a|t", "b|f", "c|t|t", "d|t", "e|t|t"], result.stdout + result.stderr
    assert "cannot execute LISTEN during recovery" in result.stderr
    assert "cannot execute CREATE TABLE in a read-only transaction" in result.stderr


def test_first_statement_routing(start_router, cluster: Cluster) -> None:
    router = start_router(split=True, transaction_routing="first_statement")
    wait_replicas_eligible(router)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        with conn.transaction():
            assert conn.execute(WHERE).fetchone()[0] is True
        conn.execute("CREATE TABLE IF NOT EXISTS split_first (id int)")
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO split_first VALUES (1)")
            assert conn.execute(WHERE).fetchone()[0] is False


def _lo_creat() -> bytes:
    """A FunctionCall of lo_creat(INV_READ | INV_WRITE), as libpq's lo_creat sends it."""
    body = struct.pack("!IHH", LO_CREAT, 1, 1) + struct.pack("!HIi", 1, 4, 0x60000) + struct.pack("!H", 1)
    return b"F" + struct.pack("!I", len(body) + 4) + body


@pytest.mark.parametrize("routing", ["conservative", "first_statement"])
def test_a_function_call_message_runs_on_the_primary(start_router, cluster: Cluster, routing: str) -> None:
    """A FunctionCall names its function by OID, which the router does not look up: the
    large-object API sends them, and lo_creat writes. Alone, and as the first statement of a
    transaction that first_statement routing places by it."""
    router = start_router(split=True, transaction_routing=routing)
    wait_replicas_eligible(router)
    client = RawClient(router.port)
    client.login_trust()
    created = []
    for begin in (False, True):
        if begin:
            client.send(m.query("BEGIN"))
            client.recv_until(b"Z")
        client.send(_lo_creat())
        replies = client.recv_until(b"Z")
        assert [kind for kind, _ in replies] == [b"V", b"Z"], replies
        created.append(struct.unpack("!I", replies[0][1][4:8])[0])
        if begin:
            client.send(m.query("COMMIT"))
            client.recv_until(b"Z")
    client.close()
    found = cluster.psql(
        f"SELECT count(*) FROM pg_largeobject_metadata WHERE oid IN ({created[0]}, {created[1]})", dbname="app"
    )
    assert found.strip() == "2"


def test_conservative_begin_stays_on_primary(split_router: RouterThread) -> None:
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        for _ in range(10):
            with conn.transaction():
                assert conn.execute(WHERE).fetchone()[0] is False
        # An empty transaction is answered by the router: no node is chosen for it.
        routed = split_router.call(lambda r: sum(r.splits["main"].decisions.values()))
        conn.execute("BEGIN")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("COMMIT")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert split_router.call(lambda r: sum(r.splits["main"].decisions.values())) == routed


@pytest.mark.parametrize("end", ["ROLLBACK", "COMMIT"])
@pytest.mark.parametrize("failure", ["wait timeout", "cancel", "bad pgrouter.target"])
def test_a_begin_answered_by_the_router_fails_like_a_transaction(start_router, failure, end) -> None:
    """BEGIN is answered by the router and sent with the transaction's first statement. When
    that statement fails before reaching a server (no primary connection within
    query_wait_timeout, a cancel while waiting, an invalid pgrouter.target), the transaction is
    aborted as on a server: ReadyForQuery 'E', then 25P02 for anything but COMMIT/ROLLBACK
    (the session's SETs of the failed transaction undone), until COMMIT (answered ROLLBACK) or
    ROLLBACK ends it. Before, it answered 'I' and the next statements ran outside any
    transaction."""
    router = start_router(split=True, pool_size=1, query_wait_timeout=1 if failure == "wait timeout" else 60)
    wait_replicas_eligible(router)
    holder = psycopg.connect(router.dsn("carol"))
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    status = psycopg.pq.TransactionStatus
    try:
        conn.execute("SET application_name = before_tx")
        conn.execute("BEGIN")
        assert conn.info.transaction_status == status.INTRANS
        if failure == "bad pgrouter.target":
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                conn.execute("SET pgrouter.target = nowhere")
        else:
            holder.execute("SELECT 1")  # holds the primary's only connection, in a transaction
            # One Query, held while it waits; the SET in it never runs.
            waiting = "SET application_name = in_failed_tx; SELECT 1"
            if failure == "wait timeout":
                with pytest.raises(psycopg.errors.TooManyConnections):
                    conn.execute(waiting)
            else:
                outcome: list = []

                def run() -> None:
                    try:
                        conn.execute(waiting)
                        outcome.append("ran")
                    except psycopg.errors.QueryCanceled as exc:
                        outcome.append(exc.sqlstate)

                t = threading.Thread(target=run)
                t.start()
                router.wait_for(
                    lambda r: sum(p.stats()["waiting"] for p in r.pools.pools.values()) == 1,
                    what="the statement queued",
                )
                conn.cancel_safe()
                t.join(10)
                assert outcome == ["57014"]
            holder.rollback()  # the primary's connection is free again
        assert conn.info.transaction_status == status.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SET pgrouter.target = replica")  # answered by the router
        assert conn.info.transaction_status == status.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 2")  # on the primary, in a transaction that failed there too
        assert conn.info.transaction_status == status.INERROR
        assert conn.execute(end).statusmessage == "ROLLBACK"
        assert conn.info.transaction_status == status.IDLE
        assert conn.execute("SHOW application_name").fetchone() == ("before_tx",)
        assert conn.execute("SELECT 3").fetchone() == (3,)
    finally:
        conn.close()
        holder.close()


def test_session_settings_follow_the_client_to_every_node(split_router: RouterThread, cluster: Cluster) -> None:
    """A session's SETs and set_config() calls are replayed on replicas too: its reads see them
    wherever they land, and a rolled-back one nowhere."""
    with psycopg.connect(split_router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SET search_path = pg_catalog, public")
        conn.execute("SELECT set_config('app.tenant', 'acme', false)")
        with conn.transaction():
            conn.execute("SELECT set_config('app.tenant', 'other', false)")
            conn.execute("ROLLBACK")  # ends the block: psycopg's own ROLLBACK is then a no-op warning
        # set_config() may write (its statement went to the primary): read-your-writes keeps
        # the reads there until the replicas have replayed it, then they spread.
        replicas = set()
        deadline = time.monotonic() + 30
        while replicas != replica_ports(cluster):
            assert time.monotonic() < deadline, f"reads reached only replicas {replicas}"
            in_recovery, port, path, tenant = conn.execute(
                "SELECT pg_is_in_recovery(), inet_server_port(), current_setting('search_path'),"
                " current_setting('app.tenant', true)"
            ).fetchone()
            assert (path, tenant) == ("pg_catalog, public", "acme"), (in_recovery, port)
            if in_recovery:
                replicas.add(port)


def test_a_lone_flush_between_transactions_takes_no_server(split_router: RouterThread) -> None:
    """psycopg can send a Flush by itself once its pipeline's replies are in. Nothing is owed
    then, so there is nothing to flush: it must not take a server connection, which no
    ReadyForQuery would ever give back (the client held a replica idle, and a BEGIN sent
    next waited for that replica to finish, for ever)."""
    client = RawClient(split_router.port)
    client.login_trust()
    client.send(m.query("SELECT 1"))
    client.recv_until(b"Z")

    def clients(r):
        return list(r.clients.values())

    split_router.call(lambda r: [setattr(c, "heard", False) for c in clients(r)])
    client.send(b"H\0\0\0\4")
    split_router.wait_for(lambda r: all(c.heard for c in clients(r)), what="the Flush read")
    assert split_router.call(lambda r: [c.server for c in clients(r)]) == [None]
    client.send(m.query("BEGIN") + m.query("SELECT pg_is_in_recovery()") + m.query("COMMIT"))
    client.recv_until(b"Z")
    reply = client.recv_until(b"Z")
    assert m.parse_data_row(reply[1][1]) == [b"f"]  # a read-write transaction: the primary
    client.recv_until(b"Z")
    client.close()


def _view_that_writes(cluster: Cluster, name: str) -> None:
    """A view whose every read inserts a row (refused_log): a write its SELECT does not show."""
    cluster.psql(
        "CREATE TABLE IF NOT EXISTS refused_log (x int);"
        " CREATE OR REPLACE FUNCTION refused_note() RETURNS int LANGUAGE sql VOLATILE"
        "  AS 'INSERT INTO refused_log VALUES (1) RETURNING x';"
        f" CREATE OR REPLACE VIEW {name} AS SELECT refused_note() AS x, pg_is_in_recovery() AS standby",
        dbname="app",
    )
    cluster.wait_replay()


@contextlib.contextmanager
def _view_locked(cluster: Cluster, name: str) -> Iterator[Callable[[], None]]:
    """``_view_that_writes``, locked by a transaction on the primary (ACCESS EXCLUSIVE,
    replayed): reads of it wait on the replicas until the block ends, or until the function
    it gives (the commit) is called."""
    from tests.integration.test_splitting_failures import _lock_replayed

    _view_that_writes(cluster, name)
    with psycopg.connect(cluster.primary.dsn("app")) as locker:
        locker.execute(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE")
        _lock_replayed(cluster, name)
        yield locker.commit


def _read_view(router: RouterThread, sql: str, outcomes: list) -> None:
    """Run ``sql`` (with $1 = 0) in a session of its own: its row, or its SQLSTATE."""
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        try:
            outcomes.append(conn.execute(sql.replace("$1", "%s"), (0,)).fetchone())
        except psycopg.Error as exc:
            outcomes.append(exc.sqlstate)


def test_a_read_a_replica_refuses_as_a_write_runs_on_the_primary(start_router, cluster: Cluster, caplog) -> None:
    """A SELECT of a view over a volatile function writes where its text does not show it.
    The replica refuses it (25006) before any byte of a reply reached the client: the router
    runs it on the primary instead, and sends that statement (and texts like it) there from
    then on, leaving the replica in service. Where the client asked for a replica (a
    read-only transaction or session, SET pgrouter.target) the 25006 is its answer, as
    PostgreSQL would give it."""
    _view_that_writes(cluster, "refused_view")
    caplog.set_level(logging.INFO, logger="pgrouter.client")
    router = start_router(split=True)
    wait_replicas_eligible(router)
    sql = "SELECT x, standby FROM refused_view WHERE x > %s"
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        assert conn.execute(sql, (0,), prepare=False).fetchone() == (1, False)
    # A change of the function catalog starts the verdicts afresh, but for the refusals. (A
    # new session: this one's write sends its reads to the primary for a while anyway.)
    router.call(lambda r: [route.verdicts.reset() for route in r.db_routes.values()])
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        for _ in range(2):  # a named statement now
            assert conn.execute(sql, (0,), prepare=True).fetchone() == (1, False)
    # The client's own choice of a replica keeps the replica's answer.
    for choose in ("BEGIN READ ONLY", "SET pgrouter.target = replica"):
        with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
            conn.execute(choose)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(sql, (0,))

    async def through_asyncpg() -> list:
        got = []
        # The same text as psycopg's, known by now; then a new one, twice. asyncpg prepares
        # (Parse, Describe, Flush) and reads the replies before its Bind/Execute/Sync: the
        # refusal of that chunk still runs it again on the primary. (A session each: one that
        # wrote reads from the primary for a while.)
        for sql in ["SELECT x, standby FROM refused_view WHERE x > $1"] + ["SELECT standby, x FROM refused_view WHERE x > $1"] * 2:
            conn = await asyncpg.connect(router.dsn("carol"))
            try:
                got.append(tuple(await conn.fetchrow(sql, 0)))
            except asyncpg.ReadOnlySQLTransactionError:
                got.append("25006")
            finally:
                await conn.close()
        return got

    assert asyncio.run(through_asyncpg()) == [(1, False), (False, 1), (False, 1)]
    with psycopg.connect(router.dsn("carol"), autocommit=True) as other:  # reads still split
        assert other.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    # One refusal per text, then straight to the primary; no replica was taken out of service.
    refusals = [r for r in caplog.records if "refused a read as a write" in r.getMessage()]
    assert len(refusals) == 2, [r.getMessage() for r in refusals]
    assert router.call(lambda r: len(r.splits["main"].topology.eligible_replicas())) == 2
    assert cluster.psql("SELECT count(*) FROM refused_log", dbname="app").strip() == "6"


def test_two_reads_a_replica_refuses_at_once_both_run_on_the_primary(start_router, cluster: Cluster, caplog) -> None:
    """Two clients run the same new text at once, both on replicas: the first refusal
    teaches the router, and the second, routed before that, runs on the primary too rather
    than finding the verdict changed and passing its 25006 on. Both reads wait on the
    replicas for a lock the primary took on the view, so that both are there together."""
    caplog.set_level(logging.INFO, logger="pgrouter.client")
    router = start_router(split=True)
    wait_replicas_eligible(router)
    sql = "SELECT x, standby FROM refused_twice WHERE x > $1"
    outcomes: list = []
    with _view_locked(cluster, "refused_twice"):
        threads = [threading.Thread(target=_read_view, args=(router, sql, outcomes)) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while sum(
            int(cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE query = '{sql}' AND wait_event_type = 'Lock'",
                             node=replica, dbname="app"))
            for replica in cluster.replicas
        ) < 2:
            assert time.monotonic() < deadline, "the reads did not both wait on replicas"
    for t in threads:
        t.join(20)
    assert outcomes == [(1, False), (1, False)]
    refusals = [r for r in caplog.records if "refused a read as a write" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]


def test_a_read_retried_after_a_failure_and_then_refused_runs_on_the_primary(start_router, cluster: Cluster) -> None:
    """A read whose replica failed under it runs again on the other replica; if that one
    refuses it as a write, it still runs on the primary: a refusal's retry is apart from a
    failure's. The read waits on the replicas for a lock the primary took on the view, so
    that its first replica's backend can be terminated under it."""
    from tests.integration.test_splitting_failures import _lock_waiter

    router = start_router(split=True)
    wait_replicas_eligible(router)
    sql = "SELECT x, standby FROM refused_after WHERE x > $1"
    outcome: list = []
    with _view_locked(cluster, "refused_after"):
        thread = threading.Thread(target=_read_view, args=(router, sql, outcome))
        thread.start()
        first, pid = _lock_waiter(cluster, sql, cluster.replicas)
        cluster.psql(f"SELECT pg_terminate_backend({pid})", node=first)
        _lock_waiter(cluster, sql, [r for r in cluster.replicas if r is not first])
    thread.join(20)
    assert outcome == [(1, False)]


def test_a_read_after_a_prepare_that_a_replica_refuses_runs_on_the_primary(start_router, cluster: Cluster) -> None:
    """asyncpg's way: Parse, Describe, Flush; the replies read; then Bind, Execute, Sync. The
    replica refuses the Execute as a write. The client has had the prepare's replies, and
    they hold for the primary too, so only the Bind/Execute/Sync runs again there: the
    client reads each reply once."""
    from tests.unit.test_prepared import FLUSH, SYNC, bind, describe, execute, parse

    _view_that_writes(cluster, "refused_prepared")
    router = start_router(split=True)
    wait_replicas_eligible(router)
    client = RawClient(router.port)
    client.login_trust()
    client.send(parse(b"s1", b"SELECT standby, x FROM refused_prepared") + describe(b"S", b"s1") + FLUSH)
    assert [kind for kind, _ in client.recv_until(b"T")] == [b"1", b"t", b"T"]
    assert router.call(lambda r: [c.replica_node is not None for c in r.clients.values()]) == [True]
    client.send(bind(b"", b"s1") + execute() + SYNC)
    replies = client.recv_until(b"Z")
    assert [kind for kind, _ in replies] == [b"2", b"D", b"C", b"Z"], replies
    assert m.parse_data_row(replies[1][1]) == [b"f", b"1"]
    client.close()


def test_a_read_sent_before_its_prepare_was_answered_runs_whole_on_the_primary(
    start_router, cluster: Cluster
) -> None:
    """The same, but the client sends the Bind/Execute/Sync before the prepare's replies
    have come, and the replica's answer to both comes at once: nothing has reached the
    client, so all of it (Parse, Describe, Flush and Bind, Execute, Sync) runs again on the
    primary, and the client reads each reply once. (Running the Bind/Execute/Sync alone
    there would leave it without the prepare's replies.) The replica's Parse waits for a
    lock the primary took on the view; the router's loop is held while the replica answers,
    so that it reads all of the answer at once."""
    from tests.integration.test_splitting_failures import _lock_waiter
    from tests.unit.test_prepared import FLUSH, SYNC, bind, describe, execute, parse

    router = start_router(split=True)
    wait_replicas_eligible(router)
    sql = "SELECT standby, x FROM refused_pipelined"
    client = RawClient(router.port)
    client.login_trust()
    with _view_locked(cluster, "refused_pipelined") as release:
        client.send(parse(b"s1", sql.encode()) + describe(b"S", b"s1") + FLUSH)
        replica, pid = _lock_waiter(cluster, sql, cluster.replicas)
        router.call(lambda r: [setattr(c, "heard", False) for c in r.clients.values()])
        client.send(bind(b"", b"s1") + execute() + SYNC)
        router.wait_for(lambda r: all(c.heard for c in r.clients.values()), what="the Bind/Execute/Sync read")
        stalled, resume = threading.Event(), threading.Event()
        router.loop.call_soon_threadsafe(lambda: (stalled.set(), resume.wait(20)))
        assert stalled.wait(10)
        try:
            release()
            deadline = time.monotonic() + 10
            while cluster.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {pid}", node=replica, dbname="app").strip() != "idle":
                assert time.monotonic() < deadline, "the replica did not answer"
        finally:
            resume.set()
    replies = client.recv_until(b"Z")
    assert [kind for kind, _ in replies] == [b"1", b"t", b"T", b"2", b"D", b"C", b"Z"], replies
    assert m.parse_data_row(replies[4][1]) == [b"f", b"1"]
    client.close()


def test_a_read_after_a_prepare_whose_replica_fails_runs_elsewhere(start_router, cluster: Cluster) -> None:
    """asyncpg's way again (Parse, Describe, Flush; Bind, Execute, Sync), and the replica's
    backend is terminated while it executes: the Bind/Execute/Sync runs again on another
    node, as a read that had sent nothing back would. (The statement sleeps only on the
    replica that prepared it.)"""
    from tests.unit.test_prepared import FLUSH, SYNC, bind, describe, execute, parse

    router = start_router(split=True)
    wait_replicas_eligible(router)
    sql = b"SELECT inet_server_port(), pg_sleep(CASE WHEN inet_server_port() = $1 THEN 60 ELSE 0 END)"
    client = RawClient(router.port)
    client.login_trust()
    client.send(parse(b"s1", sql, [23]) + describe(b"S", b"s1") + FLUSH)
    assert [kind for kind, _ in client.recv_until(b"T")] == [b"1", b"t", b"T"]
    (port,) = router.call(lambda r: [c.replica_node.port for c in r.clients.values()])
    client.send(bind(b"", b"s1", [str(port).encode()]) + execute() + SYNC)
    replica = next(r for r in cluster.replicas if r.port == port)
    deadline = time.monotonic() + 10
    while not (pid := cluster.psql("SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep'", node=replica).strip()):
        assert time.monotonic() < deadline, "the statement did not start on the replica"
    cluster.psql(f"SELECT pg_terminate_backend({pid})", node=replica)
    replies = client.recv_until(b"Z")
    assert [kind for kind, _ in replies] == [b"2", b"D", b"C", b"Z"], replies
    assert m.parse_data_row(replies[1][1])[0] != str(port).encode()
    client.close()
