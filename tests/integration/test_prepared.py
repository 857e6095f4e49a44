"""Named prepared statements through the router in transaction mode, against the real primary.

Unmodified clients with pools smaller than their connection count, so that a client's statements
meet server connections that lack them: pgbench -M prepared, asyncpg with its statement cache,
psycopg with prepare_threshold 0 and 5. Then the wire protocol by hand (tests/rawclient.py, as
carol, trust) for what drivers rarely send: Describe before Bind, several Syncs in one write,
an error mid-pipeline, a name reused after Close, two clients with one name, eviction beyond
max_prepared_statements, errors mid-pipeline that skip Parses and Closes, a name prepared twice
(42P05), pipelines whose later segments depend on how an earlier segment's Parse or Close of a
name ended (compared with a direct connection to the primary). Last, DDL that changes a
prepared statement's result columns: the router re-prepares for libpq-style clients (psycopg),
passes the error on in a transaction and to asyncpg, which then prepares again by itself.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from router.protocol import messages as m
from tests.clients.conftest import assert_pool_idle, client_env
from tests.rawclient import RawClient

# The frontend message builders of the unit tests of router/prepared.py.
from tests.unit.test_prepared import (
    FLUSH,
    SYNC,
    bind,
    close,
    describe,
    execute,
    parse,
    query,
    sync_points,
)

Replies = list[tuple[bytes, bytes]]


# --- Helpers -------------------------------------------------------------------------------------


def connect(router, **params: str) -> RawClient:
    raw = RawClient(router.port)
    raw.startup("carol", "app", **params)
    raw.recv_until(b"Z")
    return raw


def exchange(raw: RawClient, *parts: bytes) -> Replies:
    """Send the parts (Sync segments, say) in one write; read through the ReadyForQuery of each
    Sync/Query in them."""
    data = b"".join(parts)
    raw.send(data)
    replies: Replies = []
    for _ in range(sync_points(data)):
        replies += raw.recv_until(b"Z")
    return replies


def kinds(replies: Replies) -> str:
    """The message types, in order: "12DCZ" is ParseComplete, BindComplete, DataRow,
    CommandComplete, ReadyForQuery."""
    return "".join(msg_type.decode() for msg_type, _ in replies)


def rows(replies: Replies) -> list[tuple[str | None, ...]]:
    out = []
    for msg_type, body in replies:
        if msg_type != b"D":
            continue
        (count,) = struct.unpack_from("!H", body)
        pos, row = 2, []
        for _ in range(count):
            (length,) = struct.unpack_from("!i", body, pos)
            pos += 4
            if length < 0:
                row.append(None)
            else:
                row.append(body[pos : pos + length].decode())
                pos += length
        out.append(tuple(row))
    return out


def errors(replies: Replies) -> list[tuple[str, str]]:
    """(SQLSTATE, message) of each ErrorResponse."""
    out = []
    for msg_type, body in replies:
        if msg_type == b"E":
            fields = m.parse_error_fields(body)
            out.append((fields["C"], fields["M"]))
    return out


def run(raw: RawClient, statement: bytes, *params: bytes) -> Replies:
    return exchange(raw, bind(b"", statement, params) + execute() + SYNC)


PID = parse(b"", b"SELECT pg_backend_pid()") + bind(b"", b"") + execute()  # ends "12DC"


def hold_a_server(router) -> tuple[psycopg.Connection, int]:
    """Another client takes the most recently used server connection (the pool hands those out
    first) and keeps it in a transaction; returns the connection and the server's pid."""
    holder = psycopg.connect(router.dsn("carol"))
    pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
    return holder, pid


def replies_owed(router) -> list[tuple[int, int]]:
    """Per server connection: (Parses and Closes, Syncs) whose replies the router still expects."""
    return router.call(
        lambda r: [
            (len(s.stmts.ops), s.stmts.sent_z - s.stmts.recv_z)
            for p in r.pools.pools.values()
            for s in p.servers
        ]
    )


def assert_settled(router) -> None:
    owed = replies_owed(router)
    assert owed and all(entry == (0, 0) for entry in owed), owed
    assert_pool_idle(router)


def assert_calls_settled(router) -> None:
    """Query statistics: every call counted got the ReadyForQuery replies it waited for."""
    calls = router.call(lambda r: [len(s.calls) for p in r.pools.pools.values() for s in p.servers])
    assert not any(calls), calls


@pytest.fixture
def primary(cluster) -> Iterator[psycopg.Connection]:
    with psycopg.connect(cluster.primary.dsn("app"), autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(primary) -> Iterator[str]:
    name = f"prepared_{uuid.uuid4().hex[:12]}"
    primary.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, worker int, n int)")
    yield name
    primary.execute(f"DROP TABLE IF EXISTS {name}")


# --- pgbench -M prepared -------------------------------------------------------------------------

PGBENCH_SECONDS = 5


def summary(output: str, label: str) -> int:
    match = re.search(rf"^{re.escape(label)}: (\d+)", output, re.MULTILINE)
    assert match, f"no {label!r} line in pgbench output:\n{output}"
    return int(match.group(1))


@pytest.mark.parametrize("script", [["-S"], []], ids=["select-only", "tpcb"])
def test_pgbench_prepared(start_router, primary, script):
    """32 clients on 4 server connections: each client prepares its statements once (PQprepare,
    answered by the router after the first server validated them) and runs them wherever its
    transactions land."""
    router = start_router(pool_size=4)
    options = ["-M", "prepared", "-c", "32", "-j", "2", "-T", str(PGBENCH_SECONDS), *script]
    proc = subprocess.run(
        ["pgbench", *options, router.dsn("bob")],
        capture_output=True,
        text=True,
        env=client_env(PGPASSWORD="bob-pw"),
        timeout=PGBENCH_SECONDS + 60,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "query mode: prepared" in proc.stdout
    assert summary(proc.stdout, "number of failed transactions") == 0
    processed = summary(proc.stdout, "number of transactions actually processed")
    assert processed > 100
    assert "ERROR" not in proc.stderr, proc.stderr
    if not script:
        # Every TPC-B transaction inserts one history row (pgbench truncated it first).
        assert primary.execute("SELECT count(*) FROM pgbench_history").fetchone() == (processed,)
    assert_settled(router)


# --- asyncpg, statement cache on -----------------------------------------------------------------

ASYNCPG_CLIENTS = 16
ASYNCPG_ROUNDS = 200


async def test_asyncpg_statement_cache_on_rotating_server_connections(start_router, primary, table):
    router = start_router(pool_size=2)
    pids_by_worker: dict[int, set[int]] = {}

    async def worker(i: int) -> None:
        conn = await asyncpg.connect(router.dsn("alice", "alice-pw"))
        pids = pids_by_worker[i] = set()
        try:
            for n in range(ASYNCPG_ROUNDS):
                # The same statement in every client, and one of its own.
                assert await conn.fetchval("SELECT $1::int * 2", n) == 2 * n
                assert await conn.fetchval(f"SELECT $1::int + {i}", n) == n + i
                row = await conn.fetchrow(
                    "SELECT $1::text || '-' || $2::int AS tag, $3::bool", f"w{i}", n, n % 2 == 0
                )
                assert (row["tag"], row[1]) == (f"w{i}-{n}", n % 2 == 0)
                pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
            await conn.executemany(
                f"INSERT INTO {table} VALUES ($1, $2, $3)",
                [(i * 1000 + k, i, k) for k in range(50)],
            )
            async with conn.transaction():
                cursor = conn.cursor(
                    f"SELECT n FROM {table} WHERE worker = $1 ORDER BY n", i, prefetch=7
                )
                assert [r["n"] async for r in cursor] == list(range(50))
                cur = await conn.cursor("SELECT generate_series(1, $1)", 30)
                assert [r[0] for r in await cur.fetch(10)] == list(range(1, 11))
                assert [r[0] for r in await cur.fetch(25)] == list(range(11, 31))
            statement = await conn.prepare(
                f"SELECT sum(n), count(*) FROM {table} WHERE worker = $1"
            )
            for _ in range(3):
                assert [tuple(r) for r in await statement.fetch(i)] == [(sum(range(50)), 50)]
                assert await statement.fetchval(i, column=1) == 50
        finally:
            await conn.close()

    await asyncio.gather(*(worker(i) for i in range(ASYNCPG_CLIENTS)))
    all_pids = set().union(*pids_by_worker.values())
    assert len(all_pids) == 2
    assert any(len(pids) == 2 for pids in pids_by_worker.values()), pids_by_worker
    counts = primary.execute(f"SELECT count(*), count(DISTINCT worker) FROM {table}").fetchone()
    assert counts == (ASYNCPG_CLIENTS * 50, ASYNCPG_CLIENTS)
    assert_settled(router)


# --- psycopg 3 -----------------------------------------------------------------------------------

PSYCOPG_THREADS = 16
PSYCOPG_ROUNDS = 100


@pytest.mark.parametrize("prepare_threshold", [0, 5], ids=["prepare-at-once", "default-5"])
def test_psycopg_prepared_statements_from_many_threads(start_router, prepare_threshold):
    router = start_router(pool_size=2)
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with psycopg.connect(
                router.dsn("carol"), autocommit=True, prepare_threshold=prepare_threshold
            ) as conn:
                for n in range(PSYCOPG_ROUNDS):
                    assert conn.execute("SELECT %s::int * 3", (n,)).fetchone() == (3 * n,)
                    assert conn.execute("SELECT %s::int + %s::int", (n, i)).fetchone() == (n + i,)
                    if n % 10 == 0:
                        with conn.transaction():
                            cur = conn.execute("SELECT %s::text || %s::text", (f"t{i}", n))
                            assert cur.fetchone() == (f"t{i}{n}",)
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(PSYCOPG_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures
    # psycopg did prepare its three statements: the router named them (one entry per text and
    # parameter types) and a server validated them.
    assert router.call(lambda r: len(r.statements.validated)) >= 3
    assert_settled(router)


# --- The protocol by hand ------------------------------------------------------------------------


def test_describe_of_a_named_statement_before_bind(start_router):
    router = start_router(pool_size=2)
    raw = connect(router)
    statement = parse(b"next", b"SELECT $1::int + 1 AS next")
    replies = exchange(raw, statement + describe(b"S", b"next") + PID + SYNC)
    assert kinds(replies) == "1tT12DCZ"
    (t_body,) = [body for msg_type, body in replies if msg_type == b"t"]
    assert t_body == struct.pack("!HI", 1, 23)  # one parameter, int4
    (row_description,) = [body for msg_type, body in replies if msg_type == b"T"]
    assert row_description[2:7] == b"next\0"
    first_pid = int(rows(replies)[0][0])

    # On a server connection that has never seen the statement: Describe first, then Bind.
    holder, held_pid = hold_a_server(router)
    try:
        assert held_pid == first_pid
        replies = exchange(raw, describe(b"S", b"next") + PID + SYNC)
        assert kinds(replies) == "tT12DCZ"
        assert int(rows(replies)[0][0]) != first_pid
        replies = exchange(raw, bind(b"", b"next", [b"41"]) + execute() + PID + SYNC)
        assert kinds(replies) == "2DC12DCZ"
        assert rows(replies)[0] == ("42",)
        assert int(rows(replies)[1][0]) != first_pid
    finally:
        holder.close()
    assert_settled(router)


def test_pipeline_with_several_syncs(start_router):
    router = start_router(pool_size=2)
    raw = connect(router)
    replies = exchange(
        raw,
        parse(b"times", b"SELECT $1::int * 10") + SYNC,
        bind(b"", b"times", [b"1"]) + execute() + SYNC,
        parse(b"bang", b"SELECT $1::text || '!'") + bind(b"", b"bang", [b"hi"]) + execute() + SYNC,
        close(b"S", b"times") + SYNC,
        bind(b"", b"bang", [b"yo"]) + execute() + SYNC,
        bind(b"", b"times", [b"2"]) + execute() + SYNC,
    )
    assert kinds(replies) == "1Z" + "2DCZ" + "12DCZ" + "3Z" + "2DCZ" + "EZ"
    assert rows(replies) == [("10",), ("hi!",), ("yo!",)]
    # The client's own name in the error: it was closed, so it was not rewritten.
    assert errors(replies) == [("26000", 'prepared statement "times" does not exist')]
    assert_settled(router)


def test_error_mid_pipeline_skips_to_sync_and_bookkeeping_holds(start_router):
    router = start_router(pool_size=2)
    raw = connect(router)
    assert kinds(exchange(raw, parse(b"double", b"SELECT $1::int * 2") + SYNC)) == "1Z"
    replies = exchange(
        raw,
        bind(b"", b"double", [b"3"]) + execute(),
        bind(b"", b"double", [b"1", b"2"]) + execute(),  # wrong parameter count
        parse(b"later", b"SELECT 'later'") + bind(b"", b"later") + execute(),  # skipped
        SYNC,
        bind(b"", b"double", [b"5"]) + execute() + SYNC,
        parse(b"dec", b"SELECT $1::int - 1") + bind(b"", b"dec", [b"10"]) + execute() + SYNC,
    )
    assert kinds(replies) == "2DC" + "EZ" + "2DCZ" + "12DCZ"
    assert [code for code, _ in errors(replies)] == ["08P01"]
    assert rows(replies) == [("6",), ("10",), ("9",)]
    assert_settled(router)

    # The client saw its Parse of "later" skipped, so it parses it again.
    replies = exchange(
        raw, parse(b"later", b"SELECT 'later'"), bind(b"", b"later"), execute(), SYNC
    )
    assert (kinds(replies), rows(replies)) == ("12DCZ", [("later",)])
    # Everything works on the same server connection...
    assert rows(run(raw, b"double", b"7")) == [("14",)]
    assert rows(run(raw, b"dec", b"1")) == [("0",)]
    assert rows(run(raw, b"later")) == [("later",)]
    # ...and on another one.
    holder, held_pid = hold_a_server(router)
    try:
        replies = exchange(
            raw,
            bind(b"", b"double", [b"8"]) + execute(),
            bind(b"", b"dec", [b"2"]) + execute(),
            bind(b"", b"later") + execute(),
            PID + SYNC,
        )
        assert kinds(replies) == "2DC" * 3 + "12DCZ"
        assert rows(replies)[:3] == [("16",), ("1",), ("later",)]
        assert int(rows(replies)[3][0]) != held_pid
    finally:
        holder.close()
    assert_settled(router)


def test_error_in_a_simple_query_before_a_pipeline_in_the_same_write(start_router):
    router = start_router(pool_size=1)
    raw = connect(router)
    replies = exchange(
        raw,
        query(b"SELECT 1/0"),
        parse(b"x", b"SELECT 'x'") + bind(b"", b"x") + execute() + SYNC,
    )
    assert kinds(replies) == "EZ" + "12DCZ"
    assert [code for code, _ in errors(replies)] == ["22012"]
    assert rows(run(raw, b"x")) == [("x",)]
    assert_settled(router)


def test_parse_sync_of_a_validated_statement_needs_no_server_connection(start_router):
    """PQprepare (Parse+Sync) of a statement some server already parsed is answered by the
    router: it must not wait for the only server connection, held here by another client.
    One that failed on a server is never answered that way."""
    router = start_router(pool_size=1, query_wait_timeout=0.5)
    first = connect(router)
    assert kinds(exchange(first, parse(b"good", b"SELECT 'good'") + SYNC)) == "1Z"
    replies = exchange(first, parse(b"bad", b"SELEC 'bad'") + SYNC)
    assert [code for code, _ in errors(replies)] == ["42601"]
    holder, _ = hold_a_server(router)
    try:
        second = connect(router)
        assert kinds(exchange(second, parse(b"mine", b"SELECT 'good'") + SYNC)) == "1Z"
        replies = exchange(second, parse(b"bad", b"SELEC 'bad'") + SYNC)
        assert [code for code, _ in errors(replies)] == ["53300"]  # it waited for the server
    finally:
        holder.close()
    replies = exchange(second, parse(b"bad", b"SELEC 'bad'") + SYNC)
    assert [code for code, _ in errors(replies)] == ["42601"]
    assert rows(run(second, b"mine")) == [("good",)]
    assert_settled(router)


def test_name_reused_after_close(start_router):
    router = start_router(pool_size=2)
    raw = connect(router)
    replies = exchange(raw, parse(b"s", b"SELECT 'first'"), bind(b"", b"s"), execute(), SYNC)
    assert rows(replies) == [("first",)]
    replies = exchange(
        raw,
        close(b"S", b"s"),
        parse(b"s", b"SELECT 'second', $1::int"),
        bind(b"", b"s", [b"2"]),
        execute(),
        SYNC,
    )
    assert (kinds(replies), rows(replies)) == ("312DCZ", [("second", "2")])
    assert rows(run(raw, b"s", b"3")) == [("second", "3")]
    # Closed and parsed again in separate round trips, back to the first text.
    assert kinds(exchange(raw, close(b"S", b"s") + SYNC)) == "3Z"
    assert kinds(exchange(raw, parse(b"s", b"SELECT 'first'") + SYNC)) == "1Z"
    assert rows(run(raw, b"s")) == [("first",)]
    assert_settled(router)


def test_two_clients_one_name_different_queries(start_router):
    router = start_router(pool_size=1)
    a, b = connect(router), connect(router)
    assert kinds(exchange(a, parse(b"q", b"SELECT 'from a'") + SYNC)) == "1Z"
    assert kinds(exchange(b, parse(b"q", b"SELECT $1::int + 100") + SYNC)) == "1Z"
    for i in range(3):
        assert rows(run(a, b"q")) == [("from a",)]
        assert rows(run(b, b"q", str(i).encode())) == [(str(100 + i),)]
    # Closing a's statement leaves b's alone.
    assert kinds(exchange(a, close(b"S", b"q") + SYNC)) == "3Z"
    assert rows(run(b, b"q", b"5")) == [("105",)]
    assert errors(run(a, b"q")) == [("26000", 'prepared statement "q" does not exist')]
    # Same text in both: one server statement, two clients. b's Parse goes to the server that
    # has it along with its Bind: a no-op Close there, answered as ParseComplete.
    assert kinds(exchange(a, parse(b"same", b"SELECT 'shared'") + SYNC)) == "1Z"
    replies = exchange(b, parse(b"mine", b"SELECT 'shared'"), bind(b"", b"mine"), execute(), SYNC)
    assert (kinds(replies), rows(replies)) == ("12DCZ", [("shared",)])
    assert rows(run(a, b"same")) == rows(run(b, b"mine")) == [("shared",)]
    # The server knows only the router's names.
    names = rows(exchange(a, query(b"SELECT name FROM pg_prepared_statements ORDER BY 1")))
    assert len(names) == 3 and all(name.startswith("pgr_") for (name,) in names), names
    assert_settled(router)


def test_statements_and_errors_between_settings_replays(start_router):
    """Two clients with different settings on one server connection: each transaction first
    gets the router's settings prelude (its replies dropped), which must not upset the
    counting of statement replies."""
    router = start_router(pool_size=1)
    a, b = connect(router, application_name="client-a"), connect(router, application_name="b")
    setting = b"SELECT current_setting('application_name')"
    assert kinds(exchange(a, parse(b"s", setting) + SYNC)) == "1Z"
    assert kinds(exchange(b, parse(b"s", b"SELECT $1::int") + SYNC)) == "1Z"
    for i in range(3):
        replies = exchange(
            a,
            bind(b"", b"s") + execute(),
            bind(b"", b"nosuch") + parse(b"skipped", b"SELECT 'skipped'") + SYNC,
            bind(b"", b"s") + execute() + SYNC,
        )
        assert kinds(replies) == "2DCEZ2DCZ"
        assert rows(replies) == [("client-a",), ("client-a",)]
        assert rows(run(b, b"s", str(i).encode())) == [(str(i),)]
        replies = exchange(b, parse(b"t%d" % i, setting), bind(b"", b"t%d" % i), execute(), SYNC)
        assert (kinds(replies), rows(replies)) == ("12DCZ", [("b",)])
    assert_settled(router)


def test_eviction_beyond_max_prepared_statements(start_router):
    router = start_router(pool_size=1, max_prepared_statements=2)
    raw = connect(router)
    names = [b"s%d" % i for i in range(5)]
    for i, name in enumerate(names):
        assert kinds(exchange(raw, parse(name, b"SELECT $1::int * %d" % (i + 1)) + SYNC)) == "1Z"
    for round_ in range(3):
        for i, name in enumerate(names):
            assert rows(run(raw, name, str(round_ + 1).encode())) == [
                (str((round_ + 1) * (i + 1)),)
            ]
    # All five in one Sync segment: each Bind evicts and re-prepares within the pipeline.
    replies = exchange(raw, *(bind(b"", name, [b"10"]) + execute() for name in names), SYNC)
    assert kinds(replies) == "2DC" * 5 + "Z"
    assert rows(replies) == [(str(10 * (i + 1)),) for i in range(5)]
    replies = exchange(raw, query(b"SELECT count(*) FROM pg_prepared_statements"))
    assert rows(replies) == [("2",)]
    prepared = router.call(
        lambda r: [len(s.stmts.prepared) for p in r.pools.pools.values() for s in p.servers]
    )
    assert prepared == [2]
    assert_settled(router)


def test_texts_the_registry_forgot_still_run(start_router):
    """The router remembers a bounded number of texts (prepared.MAX_REGISTERED; 2 here): a
    forgotten one prepared again by another client gets a new name, the first client's
    statement keeps its own, and both run on whichever server connection, which may hold
    the text under both names."""
    router = start_router(pool_size=1)
    router.call(lambda r: setattr(r.statements, "maxsize", 2))
    first, second = connect(router), connect(router)
    texts = [b"SELECT $1::int * %d" % (i + 1) for i in range(4)]
    for raw in (first, second):
        for i, text in enumerate(texts):
            assert kinds(exchange(raw, parse(b"s%d" % i, text) + SYNC)) == "1Z"
    assert router.call(lambda r: len(r.statements)) == 2
    for _ in range(2):
        for raw in (first, second):
            for i in range(len(texts)):
                assert rows(run(raw, b"s%d" % i, b"3")) == [(str(3 * (i + 1)),)]
    assert_settled(router)


# --- Errors mid-pipeline: skipped Parses and Closes never count -----------------------------------


def test_eviction_close_skipped_after_an_error(start_router):
    router = start_router(pool_size=1, max_prepared_statements=2)
    raw = connect(router)
    assert (
        kinds(exchange(raw, parse(b"a", b"SELECT 'a'"), parse(b"b", b"SELECT 'b'"), SYNC)) == "11Z"
    )
    # The Bind fails; the Parse of c (and the Close evicting a's statement) are skipped.
    replies = exchange(raw, bind(b"", b"nosuch") + execute() + parse(b"c", b"SELECT 'c'") + SYNC)
    assert kinds(replies) == "EZ"
    replies = run(raw, b"a")
    assert errors(replies) == []  # once: 42P05 prepared statement "pgr_0" already exists
    assert rows(replies) == [("a",)]


def test_close_skipped_after_an_error(start_router):
    router = start_router(pool_size=1)
    raw = connect(router)
    assert kinds(exchange(raw, parse(b"a", b"SELECT 'a'") + SYNC)) == "1Z"
    assert kinds(exchange(raw, bind(b"", b"nosuch") + close(b"S", b"a") + SYNC)) == "EZ"
    replies = run(raw, b"a")
    assert errors(replies) == []  # once: 26000 prepared statement "a" does not exist
    assert rows(replies) == [("a",)]


def test_parse_of_a_name_the_client_has(start_router):
    """42P05 with the client's name, as PostgreSQL answers; the name keeps its statement; in
    a transaction the error aborts it."""
    router = start_router(pool_size=1)
    raw = connect(router)
    assert kinds(exchange(raw, parse(b"a", b"SELECT 'a'") + SYNC)) == "1Z"
    replies = exchange(raw, parse(b"a", b"SELECT 'b'") + bind(b"", b"a") + execute() + SYNC)
    assert kinds(replies) == "EZ"
    assert errors(replies) == [("42P05", 'prepared statement "a" already exists')]
    assert rows(run(raw, b"a")) == [("a",)]
    assert kinds(exchange(raw, query(b"BEGIN"))) == "CZ"
    replies = exchange(raw, parse(b"a", b"SELECT 'a'") + SYNC)
    assert errors(replies) == [("42P05", 'prepared statement "a" already exists')]
    assert replies[-1] == (b"Z", b"E")
    assert kinds(exchange(raw, query(b"ROLLBACK"))) == "CZ"
    assert rows(run(raw, b"a")) == [("a",)]
    assert_settled(router)


def test_messages_after_the_error_was_read_but_before_sync(start_router):
    router = start_router(pool_size=1)
    raw = connect(router)
    raw.send(bind(b"", b"nosuch") + FLUSH)
    msg_type, body = raw.recv_message()  # PostgreSQL sends an ErrorResponse at once
    assert (msg_type, m.parse_error_fields(body)["C"]) == (b"E", "26000")
    assert kinds(exchange(raw, parse(b"b", b"SELECT 'b'") + SYNC)) == "Z"  # skipped
    replies = exchange(raw, parse(b"b", b"SELECT 'b'") + bind(b"", b"b") + execute() + SYNC)
    assert errors(replies) == []
    assert (kinds(replies), rows(replies)) == ("12DCZ", [("b",)])
    assert_settled(router)


def test_unnamed_parse_before_a_failing_named_parse_in_another_chunk(start_router):
    router = start_router(pool_size=1)
    raw = connect(router)
    raw.send(parse(b"", b"SELECT 1"))
    router.wait_for(
        lambda r: any(s.client is not None for p in r.pools.pools.values() for s in p.servers),
        what="the unnamed Parse forwarded to a server connection",
    )
    replies = exchange(raw, parse(b"bad", b"SELEC 1") + SYNC)
    assert kinds(replies) == "1EZ"
    assert [code for code, _ in errors(replies)] == ["42601"]
    replies = exchange(raw, parse(b"bad2", b"SELEC 1") + SYNC)
    assert kinds(replies) == "EZ"  # not "1Z", answered by the router
    assert [code for code, _ in errors(replies)] == ["42601"]


def test_pipelined_segment_after_a_skipped_injected_parse(start_router):
    router = start_router(pool_size=2)
    raw = connect(router)
    assert kinds(exchange(raw, parse(b"a", b"SELECT 'a'") + SYNC)) == "1Z"
    holder, _ = hold_a_server(router)  # the next segments go to a server lacking a
    try:
        replies = exchange(
            raw,
            bind(b"", b"nosuch") + bind(b"", b"a") + SYNC,
            bind(b"", b"a") + execute() + SYNC,
        )
        assert kinds(replies) == "EZ2DCZ"  # once: "EZEZ"
        assert rows(replies) == [("a",)]
    finally:
        holder.close()


def test_pipelined_parse_of_a_failing_statement_twice(start_router):
    router = start_router(pool_size=1)
    raw = connect(router)
    replies = exchange(raw, parse(b"a", b"SELEC 1") + SYNC, parse(b"b", b"SELEC 1") + SYNC)
    assert kinds(replies) == "EZEZ"  # once: "EZ1Z"


# --- Pipelines whose later segments depend on how an earlier one ends ----------------------------
# The same messages in one write to the primary directly and through the router: the client
# must get the same replies. Whether an earlier segment's Parse or Close of a name takes effect
# (or fails, or is skipped after an error) decides what a later segment's use of the name does.


def direct(cluster) -> RawClient:
    """A connection straight to the primary (trust), as the router's own server logins."""
    raw = RawClient(cluster.primary.port)
    raw.startup("postgres", "app")
    raw.recv_until(b"Z")
    return raw


def answers(replies: Replies) -> list[tuple[str, object]]:
    """Replies as comparable values: an ErrorResponse by (SQLSTATE, message), the rest whole."""
    out: list[tuple[str, object]] = []
    for msg_type, body in replies:
        if msg_type == b"E":
            fields = m.parse_error_fields(body)
            out.append(("E", (fields["C"], fields["M"])))
        else:
            out.append((msg_type.decode(), body))
    return out


def test_pipelined_parse_of_a_name_whose_earlier_parse_failed(start_router, cluster):
    """Parse s1 fails (syntax error) and its segment ends; the next segment parses s1 again,
    validly: the first Parse never created s1, so this one succeeds, and s1 means the new
    statement in that segment and the ones after it."""
    router = start_router(pool_size=2)
    segments = (
        parse(b"s1", b"SELEC 1") + SYNC,
        parse(b"s1", b"SELECT $1::int * 3") + bind(b"", b"s1", [b"7"]) + execute() + SYNC,
        bind(b"", b"s1", [b"2"]) + execute() + SYNC,
        describe(b"S", b"s1") + SYNC,
    )
    expected = exchange(direct(cluster), *segments)
    assert kinds(expected) == "EZ" + "12DCZ" + "2DCZ" + "tTZ"
    raw = connect(router)
    replies = exchange(raw, *segments)
    assert answers(replies) == answers(expected)
    assert rows(replies) == [("21",), ("6",)]
    assert_settled(router)
    assert_calls_settled(router)

    # Later transactions: s1 is the valid statement, here and on the other server connection.
    assert rows(run(raw, b"s1", b"5")) == [("15",)]
    holder, held_pid = hold_a_server(router)
    try:
        replies = exchange(raw, bind(b"", b"s1", [b"4"]) + execute() + PID + SYNC)
        assert rows(replies)[0] == ("12",)
        assert int(rows(replies)[1][0]) != held_pid
    finally:
        holder.close()
    replies = exchange(raw, parse(b"s1", b"SELECT 1") + SYNC)
    assert errors(replies) == [("42P05", 'prepared statement "s1" already exists')]
    assert_settled(router)


@pytest.mark.parametrize("skipped", [True, False], ids=["close-skipped", "close-done"])
def test_pipelined_use_of_a_name_after_its_close(start_router, cluster, skipped):
    """A Close of s1 in an earlier segment: when an error before it made the server skip it
    (close-skipped), s1 still exists in the later segments; otherwise (close-done) it is gone.
    Later segments Bind, Parse and Describe s1 in one write with the Close."""
    router = start_router(pool_size=2)
    first = bind(b"", b"nosuch") if skipped else b""
    segments = (
        first + close(b"S", b"s1") + SYNC,
        bind(b"", b"s1", [b"7"]) + execute() + SYNC,
        parse(b"s1", b"SELECT $1::int + 1") + SYNC,
        describe(b"S", b"s1") + bind(b"", b"s1", [b"8"]) + execute() + SYNC,
    )
    prepare = parse(b"s1", b"SELECT $1::int * 3") + SYNC
    own = direct(cluster)
    assert kinds(exchange(own, prepare)) == "1Z"
    expected = exchange(own, *segments)
    if skipped:
        assert kinds(expected) == "EZ" + "2DCZ" + "EZ" + "tT2DCZ"
    else:
        assert kinds(expected) == "3Z" + "EZ" + "1Z" + "tT2DCZ"
    raw = connect(router)
    assert kinds(exchange(raw, prepare)) == "1Z"
    replies = exchange(raw, *segments)
    assert answers(replies) == answers(expected)
    assert_settled(router)
    assert_calls_settled(router)

    # Later transactions agree on what s1 is, on either server connection.
    value = "24" if skipped else "9"
    assert rows(run(raw, b"s1", b"8")) == [(value,)]
    holder, held_pid = hold_a_server(router)
    try:
        replies = exchange(raw, bind(b"", b"s1", [b"8"]) + execute() + PID + SYNC)
        assert rows(replies)[0] == (value,)
        assert int(rows(replies)[1][0]) != held_pid
    finally:
        holder.close()
    assert_settled(router)


def test_later_writes_wait_behind_a_use_that_waits(start_router, cluster):
    """The first write is still running (pg_sleep) when the next arrive: the Bind of s1 waits
    for its outcome (its Close is skipped), and a plain Query written after it waits behind
    it, so that everything reaches the server in the client's order."""
    router = start_router(pool_size=1)
    writes = (
        parse(b"", b"SELECT pg_sleep(0.3)") + bind(b"", b"") + execute()
        + bind(b"", b"nosuch") + close(b"S", b"s1") + SYNC,
        bind(b"", b"s1") + execute() + SYNC,
        query(b"SELECT 'after'"),
    )
    results = []
    for raw in (direct(cluster), connect(router)):
        assert kinds(exchange(raw, parse(b"s1", b"SELECT 'kept'") + SYNC)) == "1Z"
        for data in writes:
            raw.send(data)
        results.append(raw.recv_until(b"Z") + raw.recv_until(b"Z") + raw.recv_until(b"Z"))
    expected, replies = results
    assert kinds(expected) == "12DC" + "EZ" + "2DCZ" + "TDCZ"
    assert answers(replies) == answers(expected)
    assert rows(replies)[1:] == [("kept",), ("after",)]
    assert_settled(router)
    assert_calls_settled(router)


def wait_until_running(primary: psycopg.Connection, sql: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while primary.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s", (sql,)
    ).fetchone()[0] == 0:
        assert time.monotonic() < deadline, f"{sql} never started"
        time.sleep(0.01)


def test_named_parse_waits_for_the_replies_of_an_unqueued_pipeline(start_router, cluster, primary):
    """An unnamed Parse ... Sync chunk (pgbench -M extended) goes out without queueing the
    replies it expects. A named Parse arriving while those are still on their way (pg_sleep
    holds them in the server's buffer) must not be queued ahead of them: the reply the router
    turns into this Parse's ParseComplete (a Close, as the server has the text already) would
    be matched with the earlier chunk's ParseComplete instead, and the client would get a
    CloseComplete for its Parse."""
    router = start_router(pool_size=1)
    sleep = "SELECT pg_sleep(0.3)"
    results = []
    for raw in (direct(cluster), connect(router)):
        assert kinds(exchange(raw, parse(b"s0", b"SELECT 'x'") + SYNC)) == "1Z"
        raw.send(parse(b"", sleep.encode()) + bind(b"", b"") + execute() + SYNC)
        wait_until_running(primary, sleep)
        raw.send(parse(b"s1", b"SELECT 'x'") + bind(b"", b"s1") + execute() + SYNC)
        results.append(raw.recv_until(b"Z") + raw.recv_until(b"Z"))
    expected, replies = results
    assert kinds(expected) == "12DCZ" + "12DCZ"
    assert answers(replies) == answers(expected)
    assert_settled(router)
    assert_calls_settled(router)


# --- Re-prepare after DDL: "cached plan must not change result type" ------------------------------


def reprepared(router) -> int:
    return router.call(lambda r: r.reprepared)


def test_reprepare_after_ddl_raw(start_router, primary, table):
    """Bind, Describe portal, Execute, Sync (libpq's way) of a statement whose result columns
    changed: the router closes and prepares it again and reruns the exchange; the client sees
    only the new result. Without a Describe (asyncpg's way) the error reaches the client, and
    the next Parse of the text prepares a fresh statement."""
    router = start_router(pool_size=1)
    primary.execute(f"INSERT INTO {table} VALUES (1, 2, 3)")
    raw = connect(router)
    select = f"SELECT * FROM {table}".encode()
    assert kinds(exchange(raw, parse(b"s", select) + SYNC)) == "1Z"
    run_described = bind(b"", b"s") + describe(b"P", b"") + execute() + SYNC
    assert rows(exchange(raw, run_described)) == [("1", "2", "3")]
    primary.execute(f"ALTER TABLE {table} ADD COLUMN extra text DEFAULT 'x'")
    replies = exchange(raw, run_described)
    assert (kinds(replies), errors(replies)) == ("2TDCZ", [])
    assert rows(replies) == [("1", "2", "3", "x")]
    assert replies[-1] == (b"Z", b"I")
    assert reprepared(router) == 1
    assert rows(exchange(raw, run_described)) == [("1", "2", "3", "x")]

    primary.execute(f"ALTER TABLE {table} DROP COLUMN extra")
    replies = run(raw, b"s")
    assert [code for code, _ in errors(replies)] == ["0A000"]
    assert kinds(replies) == "EZ"
    replies = exchange(raw, parse(b"s2", select) + describe(b"S", b"s2") + SYNC)
    assert kinds(replies) == "1tTZ"
    assert rows(run(raw, b"s2")) == [("1", "2", "3")]
    assert reprepared(router) == 1
    assert_settled(router)


def test_reprepare_after_ddl_psycopg(start_router, primary, table):
    router = start_router(pool_size=2)
    primary.execute(f"INSERT INTO {table} VALUES (1, 2, 3)")
    select = f"SELECT * FROM {table}"
    with (
        psycopg.connect(router.dsn("carol"), prepare_threshold=0, autocommit=True) as a,
        psycopg.connect(router.dsn("carol"), prepare_threshold=0, autocommit=True) as b,
    ):
        for conn in (a, b, a, b):
            assert conn.execute(select).fetchall() == [(1, 2, 3)]
        primary.execute(f"ALTER TABLE {table} ADD COLUMN extra text DEFAULT 'x'")
        for conn in (a, b, a, b, a, b):
            cur = conn.execute(select)
            assert [column.name for column in cur.description] == ["id", "worker", "n", "extra"]
            assert cur.fetchall() == [(1, 2, 3, "x")]
    assert reprepared(router) >= 1
    assert_settled(router)


def test_stale_plan_in_a_transaction_reaches_the_client(start_router, primary, table):
    """In a transaction the error has aborted it: the client must see it."""
    router = start_router(pool_size=1)
    select = f"SELECT * FROM {table}"
    with psycopg.connect(router.dsn("carol"), prepare_threshold=0) as conn:
        conn.execute(select).fetchall()
        conn.commit()
        primary.execute(f"ALTER TABLE {table} ADD COLUMN extra text")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="cached plan"):
            conn.execute(select)
        conn.rollback()
    assert reprepared(router) == 0
    assert_settled(router)


async def test_asyncpg_prepares_again_after_ddl(start_router, primary, table):
    """asyncpg executes its cached statements without a Describe: the router passes the error
    on, asyncpg prepares the text again (outside a transaction) and gets a fresh statement."""
    router = start_router(pool_size=2)
    primary.execute(f"INSERT INTO {table} VALUES (1, 2, 3)")
    select = f"SELECT * FROM {table}"
    conns = [await asyncpg.connect(router.dsn("alice", "alice-pw")) for _ in range(2)]
    try:
        for conn in conns * 2:
            assert [tuple(r) for r in await conn.fetch(select)] == [(1, 2, 3)]
        primary.execute(f"ALTER TABLE {table} ADD COLUMN extra text DEFAULT 'x'")
        for conn in conns * 3:
            records = await conn.fetch(select)
            assert [dict(r) for r in records] == [{"id": 1, "worker": 2, "n": 3, "extra": "x"}]
        primary.execute(f"ALTER TABLE {table} DROP COLUMN extra")
        async with conns[0].transaction():
            with pytest.raises(asyncpg.exceptions.InvalidCachedStatementError):
                await conns[0].fetch(select)
        assert [tuple(r) for r in await conns[0].fetch(select)] == [(1, 2, 3)]
    finally:
        for conn in conns:
            await conn.close()
    assert_settled(router)


class SplitErrorsProxy:
    """A TCP proxy in front of the primary that delivers each ErrorResponse from the server in
    two writes, 0.1 s apart, so that the router reads it in two parts (its other bytes pass
    as they come). Connections opening with an SSLRequest (asyncpg's monitors) pass untouched."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.split = 0  # ErrorResponses split so far
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            for sock in (down, up):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [down, up]
            threading.Thread(target=self._client_to_server, args=(down, up), daemon=True).start()

    def _client_to_server(self, down: socket.socket, up: socket.socket) -> None:
        first = down.recv(65536)
        ssl_request = first[:8] == struct.pack("!II", 8, 80877103)
        up.sendall(first)
        threading.Thread(target=self._server_to_client, args=(up, down, ssl_request), daemon=True).start()
        self._pump(down, up)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def _server_to_client(self, up: socket.socket, down: socket.socket, raw: bool) -> None:
        if raw:
            self._pump(up, down)
            return
        buf = b""
        try:
            while data := up.recv(65536):
                buf += data
                pos = 0
                while pos + 5 <= len(buf):
                    end = pos + 1 + struct.unpack_from("!I", buf, pos + 1)[0]
                    if end > len(buf):
                        break
                    if buf[pos : pos + 1] == b"E":
                        half = pos + 5 + (end - pos - 5) // 2
                        down.sendall(buf[:half])
                        time.sleep(0.1)
                        buf, pos, end = buf[half:], 0, end - half
                        self.split += 1
                    pos = end
                down.sendall(buf[:pos])
                buf = buf[pos:]
        except OSError:
            pass
        finally:
            down.close()

    def close(self) -> None:
        self.listener.close()
        for sock in self._socks:
            sock.close()


def test_reprepare_when_the_stale_plan_error_arrives_in_two_reads(start_router, primary, table):
    proxy = SplitErrorsProxy(primary.info.host, primary.info.port)
    try:
        cluster_through_proxy = {"primary": {"host": "127.0.0.1", "port": proxy.port}, "replicas": []}
        router = start_router(pool_size=1, clusters={"main": cluster_through_proxy})
        primary.execute(f"INSERT INTO {table} VALUES (1, 2, 3)")
        raw = connect(router)
        assert kinds(exchange(raw, parse(b"s", f"SELECT * FROM {table}".encode()) + SYNC)) == "1Z"
        run_described = bind(b"", b"s") + describe(b"P", b"") + execute() + SYNC
        assert rows(exchange(raw, run_described)) == [("1", "2", "3")]
        primary.execute(f"ALTER TABLE {table} ADD COLUMN extra text DEFAULT 'x'")
        split_before = proxy.split
        replies = exchange(raw, run_described)
        assert proxy.split == split_before + 1  # the stale plan error, in two parts
        assert (kinds(replies), errors(replies)) == ("2TDCZ", [])
        assert rows(replies) == [("1", "2", "3", "x")]
        assert reprepared(router) == 1
        assert_settled(router)
    finally:
        proxy.close()


def test_reprepare_on_each_server_connection_holding_the_stale_statement(start_router, primary, table):
    """The statement is prepared on both server connections; after the DDL each of them
    fails once and is re-prepared, on the client's next run there."""
    router = start_router(pool_size=2)
    primary.execute(f"INSERT INTO {table} VALUES (1, 2, 3)")
    select = f"SELECT * FROM {table}"
    with psycopg.connect(router.dsn("carol"), prepare_threshold=0, autocommit=True) as conn:

        def run_elsewhere() -> list[tuple]:
            holder, _ = hold_a_server(router)  # the connection the client last used
            try:
                return conn.execute(select).fetchall()
            finally:
                holder.close()

        assert conn.execute(select).fetchall() == [(1, 2, 3)]
        assert run_elsewhere() == [(1, 2, 3)]
        primary.execute(f"ALTER TABLE {table} ADD COLUMN extra text DEFAULT 'x'")
        assert conn.execute(select).fetchall() == [(1, 2, 3, "x")]
        assert run_elsewhere() == [(1, 2, 3, "x")]
        assert reprepared(router) == 2
        assert conn.execute(select).fetchall() == [(1, 2, 3, "x")]
        assert run_elsewhere() == [(1, 2, 3, "x")]
    assert reprepared(router) == 2
    assert_settled(router)
