"""asyncpg, unmodified and with default settings, through the router.

asyncpg prepares every parameterised query as a named statement (__asyncpg_stmt_N__) and reuses
it from its statement cache. In transaction mode that only works while every transaction lands
on the same server connection, so these tests use a pool of ONE server connection (or session
mode). Carrying named prepared statements across pooled server connections is a later issue.
"""

from __future__ import annotations

import asyncio
import hashlib
import io

import asyncpg
import pytest

from tests.clients.conftest import (
    LARGE_DIGEST,
    LARGE_QUERY,
    LARGE_ROWS,
    assert_pool_idle,
    assert_server_free_for_others,
    committed_ids,
)


@pytest.fixture(params=["transaction", "session"])
def mode_router(request, start_router):
    """Transaction mode with a single server connection (see the module docstring), or
    session mode with the default pool."""
    if request.param == "transaction":
        return start_router(pool_size=1)
    return start_router(pool_mode="session")


@pytest.fixture
def one_server_router(start_router):
    """Transaction mode, one server connection: asyncpg's prepared statements stay valid."""
    return start_router(pool_size=1)


@pytest.fixture
async def conn(one_server_router):
    conn = await asyncpg.connect(one_server_router.dsn("alice", "alice-pw"))
    yield conn
    await conn.close()


async def test_fetch_execute_executemany(mode_router, primary, table):
    router = mode_router
    conn = await asyncpg.connect(router.dsn("alice", "alice-pw"))
    try:
        assert await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "one") == "INSERT 0 1"
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"n{i}") for i in range(2, 101)])
        # Twice each: the second run reuses asyncpg's cached prepared statement.
        for _ in range(2):
            rows = await conn.fetch(f"SELECT id, note FROM {table} WHERE id <= $1 ORDER BY id", 3)
            assert [tuple(r) for r in rows] == [(1, "one"), (2, "n2"), (3, "n3")]
            row = await conn.fetchrow(f"SELECT id, note FROM {table} WHERE id = $1", 50)
            assert (row["id"], row["note"]) == (50, "n50")
            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE note LIKE $1", "n%") == 99
        # No arguments: the simple protocol, several statements in one message.
        assert await conn.execute(f"UPDATE {table} SET note = 'x' WHERE id = 1; SELECT 1") == "SELECT 1"
    finally:
        await conn.close()
    assert committed_ids(primary, table) == list(range(1, 101))
    assert primary.execute(f"SELECT note FROM {table} WHERE id = 1").fetchone() == ("x",)
    assert_pool_idle(router)


async def test_transactions_commit_and_roll_back(mode_router, primary, table):
    router = mode_router
    conn = await asyncpg.connect(router.dsn("alice", "alice-pw"))
    insert = f"INSERT INTO {table} VALUES ($1, 'tx')"
    try:
        async with conn.transaction():
            await conn.execute(insert, 1)
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute(insert, 2)
                raise RuntimeError("roll back")
        async with conn.transaction():
            await conn.execute(insert, 3)
            with pytest.raises(RuntimeError):
                async with conn.transaction():  # a savepoint
                    await conn.execute(insert, 4)
                    raise RuntimeError("roll back to savepoint")
            await conn.execute(insert, 5)
        assert not conn.is_in_transaction()
    finally:
        await conn.close()
    assert committed_ids(primary, table) == [1, 3, 5]
    assert_pool_idle(router)


async def test_error_inside_transaction(one_server_router, conn, primary, table):
    tx = conn.transaction()
    await tx.start()
    await conn.execute(f"INSERT INTO {table} VALUES ($1, 'doomed')", 1)
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.fetchval("SELECT 1 / $1::int", 0)
    with pytest.raises(asyncpg.InFailedSQLTransactionError) as exc:
        await conn.fetchval("SELECT $1::int", 1)
    assert exc.value.sqlstate == "25P02"
    await tx.rollback()
    assert await conn.fetchval("SELECT $1::text", "usable") == "usable"
    assert committed_ids(primary, table) == []
    assert_pool_idle(one_server_router)


async def test_errors_outside_transaction_leave_connection_usable(one_server_router, conn):
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await conn.execute("SELEC 1")  # simple protocol
    with pytest.raises(asyncpg.UndefinedTableError):
        await conn.fetch("SELECT * FROM no_such_table WHERE x = $1", 1)  # fails at Parse
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.fetchval("SELECT 1 / $1::int", 0)  # fails at Execute
    assert not conn.is_in_transaction()
    assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
    assert_pool_idle(one_server_router)


async def test_cursors_inside_a_transaction(one_server_router, conn):
    async with conn.transaction():
        total = 0
        async for record in conn.cursor("SELECT generate_series(1, $1) AS n", 10_000, prefetch=500):
            total += record["n"]
        assert total == sum(range(1, 10_001))
        cursor = await conn.cursor("SELECT generate_series(1, 100) AS n")
        assert await cursor.forward(10) == 10
        assert [r["n"] for r in await cursor.fetch(5)] == [11, 12, 13, 14, 15]
        assert (await cursor.fetchrow())["n"] == 16
    assert_pool_idle(one_server_router)


async def test_large_result_checksum(one_server_router, conn):
    expected = await conn.fetchval(LARGE_DIGEST)
    rows = await conn.fetch(LARGE_QUERY)
    assert len(rows) == LARGE_ROWS
    data = ",".join(f"{i}:{text}" for i, text in rows).encode()
    assert len(data) > 100_000_000
    assert hashlib.md5(data).hexdigest() == expected
    assert_pool_idle(one_server_router)


async def test_copy_both_ways(one_server_router, conn, primary, table):
    records = [(i, f"copied {i}") for i in range(50_000)]
    assert await conn.copy_records_to_table(table, records=records) == "COPY 50000"
    assert primary.execute(f"SELECT count(*), max(note) FROM {table}").fetchone() == (50_000, "copied 9999")
    out = io.BytesIO()
    await conn.copy_from_query(f"SELECT id, note FROM {table} ORDER BY id", output=out)
    assert out.getvalue() == "".join(f"{i}\t{note}\n" for i, note in records).encode()
    # (Whether the server connection is free afterwards: the next test.)


async def test_copy_records_to_table_does_not_hold_a_server_connection(start_router, table):
    router = start_router(pool_size=1, query_wait_timeout=2)
    conn = await asyncpg.connect(router.dsn("alice", "alice-pw"))
    try:
        assert await conn.copy_records_to_table(table, records=[(1, "one")]) == "COPY 1"
        assert not conn.is_in_transaction()
        assert_server_free_for_others(router)
    finally:
        await conn.close()


async def test_notices_reach_the_log_listener(conn):
    notices: asyncio.Queue = asyncio.Queue()
    conn.add_log_listener(lambda _conn, message: notices.put_nowait((message.severity, message.message)))
    await conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from %', 6 * 7; END $$")
    assert await asyncio.wait_for(notices.get(), 10) == ("NOTICE", "hello from 42")
    assert await conn.fetchval("SELECT 1") == 1


async def test_20_clients_take_turns_on_one_server_connection(one_server_router):
    router = one_server_router
    first = await asyncpg.connect(router.dsn("alice", "alice-pw"))
    # The pool's one server connection is open now; the others connect together.
    others = await asyncio.gather(*(asyncpg.connect(router.dsn("alice", "alice-pw")) for _ in range(19)))
    clients = [first, *others]

    async def work(n: int, conn: asyncpg.Connection) -> list[int]:
        pids = []
        for q in range(50):
            assert await conn.fetchval("SELECT $1::int * 1000 + $2::int", n, q) == n * 1000 + q
            if q % 10 == 0:
                async with conn.transaction():
                    pids.append(await conn.fetchval("SELECT pg_backend_pid()"))
                    assert await conn.fetchval("SELECT $1::text", f"tx {n}") == f"tx {n}"
        return pids

    try:
        pids = await asyncio.gather(*(work(n, c) for n, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert len({pid for client_pids in pids for pid in client_pids}) == 1
    assert_pool_idle(router)
    [stats] = router.pool_stats().values()
    assert stats["servers"] == 1 and stats["waiting"] == 0


async def test_listen_notify_in_session_mode(start_router):
    router = start_router(pool_mode="session")
    listener = await asyncpg.connect(router.dsn("alice", "alice-pw"))
    notifier = await asyncpg.connect(router.dsn("bob", "bob-pw"))
    received: asyncio.Queue = asyncio.Queue()
    try:
        await listener.add_listener("router_news", lambda _c, _pid, channel, payload: received.put_nowait((channel, payload)))
        await notifier.execute("NOTIFY router_news, 'first'")
        await notifier.execute("SELECT pg_notify('router_news', 'second')")
        got = [await asyncio.wait_for(received.get(), 10) for _ in range(2)]
        assert got == [("router_news", "first"), ("router_news", "second")]
        assert await listener.fetchval("SELECT 'still usable'") == "still usable"
    finally:
        await listener.close()
        await notifier.close()
