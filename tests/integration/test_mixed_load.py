"""Many clients doing different things at once through one splitting router, while server
backends are terminated under them: what one client does never shows in another's session,
and what the router keeps (statement names, settings, pooled connections) stays right.

The targeted tests pin each behaviour down; this one looks for what only their mix shows.
It (and the throwaway chaos runs it grew from) found five bugs: a FATAL read with a
transaction's last reply went to the client whose transaction had ended; a replica's read
retried elsewhere met its own statement name (42P05), once through an unanswered Parse and
once through a reply dropped with the FATAL; a lone Flush from psycopg took a server
connection that nothing gave back; and asyncpg's COPY data, sent while its query waited for
a server connection, was dropped. Run in session mode too, it found two more: a reset of a
departing client's server connection wrote to a closed transport (a logged traceback), and
a cancel's connection closed before the cancel reached the server, so that it could hit
the client's next statement.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter

import asyncpg
import psycopg
import pytest

from router.config import Settings
from tests.cluster import Cluster
from tests.conftest import router_config
from tests.harness import RouterThread

WORKERS = 12  # asyncpg clients
PSYCOPG_WORKERS = 2
LOAD_SECONDS = 8.0
APP = "mixed-"  # application_name prefix: the backends this test may terminate


def connection_lost(exc: BaseException) -> bool:
    """Errors a client may get when its server backend is terminated under it (the outcome
    any client of PostgreSQL itself would see)."""
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        return True  # asyncpg after its connection closed (or a FATAL between its messages)
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError | ConnectionError | psycopg.OperationalError):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate.startswith(("08", "57P0"))


class Load:
    def __init__(self, router: RouterThread, deadline: float) -> None:
        self.router, self.deadline = router, deadline
        self.wrong: list[str] = []  # what must never happen
        self.lost = Counter()  # connections lost to terminated backends, by error
        self.actions = Counter()

    def note_error(self, who: str, exc: BaseException) -> None:
        """A lost connection is counted; any other error is wrong."""
        if connection_lost(exc):
            self.lost[type(exc).__name__] += 1
        else:
            self.wrong.append(f"{who}: {exc!r}")

    async def asyncpg_client(self, w: int) -> None:
        rnd = random.Random(w)
        mine = f"w{w}"
        conn: asyncpg.Connection | None = None
        rows = 0  # this client's committed rows
        fresh = True  # a session that has not committed a write yet
        unsure = 0  # commits whose outcome a lost connection hid
        while time.monotonic() < self.deadline:
            action = "connect"
            try:
                if conn is None:
                    # command_timeout: a call left without a reply fails the test instead of hanging it.
                    conn = await asyncpg.connect(self.router.dsn("carol"), command_timeout=20,
                                                 server_settings={"application_name": f"{APP}{w}"})
                    await conn.execute(f"SET mixed.w = '{mine}'")
                    fresh = True
                action = rnd.choice("settings write write read prepared cancel error abandon timeout copy pin".split())
                self.actions[action] += 1
                if action == "settings":
                    got = tuple(await conn.fetchrow(
                        "SELECT current_setting('mixed.w'), current_setting('application_name'),"
                        " current_setting('statement_timeout')"
                    ))
                    if got != (mine, f"{APP}{w}", "0"):
                        self.wrong.append(f"client {w} sees another session's settings: {got}")
                elif action in ("write", "read"):
                    if action == "write":
                        keep = rnd.random() < 0.7
                        try:
                            async with conn.transaction():
                                await conn.execute("INSERT INTO mixed (w, n) VALUES ($1, $2)", w, rows)
                                if not keep:
                                    raise LookupError  # rolled back
                        except LookupError:
                            pass
                        except BaseException:
                            unsure += keep
                            raise
                        rows += keep
                        fresh = fresh and not keep
                    async with conn.transaction(readonly=action == "read"):
                        seen = await conn.fetchval("SELECT count(*) FROM mixed WHERE w = $1", w)
                    if fresh and (unsure or seen != rows):
                        # Read-your-writes is per session: a new one carries no token for its
                        # predecessor's writes, which its replica may not have replayed yet.
                        # The primary has every committed row (and tells a doubtful commit).
                        seen = await conn.fetchval("/* pgrouter: primary */ SELECT count(*) FROM mixed WHERE w = $1", w)
                    if unsure and rows <= seen <= rows + unsure:
                        rows, unsure = seen, 0
                    elif seen != rows:  # read-your-writes: a replica only once it has them
                        self.wrong.append(f"client {w} counts {seen} of its rows, not {rows}")
                elif action == "prepared":
                    k, x = rnd.randrange(40), rnd.randrange(1000)
                    got = await conn.fetchval(f"SELECT $1::int + {k}", x)
                    if got != x + k:
                        self.wrong.append(f"client {w}: SELECT {x} + {k} gave {got}")
                elif action == "cancel":
                    try:
                        await asyncio.wait_for(conn.execute("SELECT pg_sleep(5)"), rnd.choice([0.01, 0.05, 0.2]))
                        self.wrong.append(f"client {w}: pg_sleep(5) was not cancelled")
                    except TimeoutError:
                        pass
                elif action == "error":
                    try:
                        async with conn.transaction():
                            await conn.execute("SELECT 1/0")
                    except asyncpg.DivisionByZeroError:
                        pass
                elif action == "abandon":
                    # Gone mid-transaction without a word: its row must never be committed.
                    await conn.execute("BEGIN")
                    await conn.execute("INSERT INTO mixed (w, n) VALUES ($1, -1)", w)
                    conn.terminate()
                    conn = None
                elif action == "copy":
                    # asyncpg sends the data without waiting for CopyInResponse.
                    records = [(w, -2 - i) for i in range(rnd.randrange(1, 40))]
                    async with conn.transaction():
                        await conn.copy_records_to_table("mixed", records=records)
                        copied = await conn.execute("DELETE FROM mixed WHERE w = $1 AND n <= -2", w)
                    if copied != f"DELETE {len(records)}":
                        self.wrong.append(f"client {w}: copied {len(records)} rows, deleted {copied}")
                elif action == "pin":
                    # A session advisory lock pins the client to its server connection.
                    await conn.execute("SELECT pg_advisory_lock($1)", w)
                    held = await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1"
                        " AND pid = pg_backend_pid()", w,
                    )
                    await conn.execute("SELECT pg_advisory_unlock_all()")
                    if held != 1:
                        self.wrong.append(f"client {w}: its advisory lock is not on its connection")
                elif action == "timeout":
                    try:
                        async with conn.transaction():
                            await conn.execute("SET LOCAL statement_timeout = 20")
                            await conn.execute("SELECT pg_sleep(1)")
                        self.wrong.append(f"client {w}: statement_timeout did not fire")
                    except asyncpg.QueryCanceledError:
                        pass
            except Exception as exc:  # noqa: BLE001 - sorted by note_error
                self.note_error(f"client {w} ({action})", exc)
                if conn is not None:
                    conn.terminate()
                conn = None
        if conn is not None:
            await conn.close()

    def psycopg_client(self, w: int) -> None:
        rnd = random.Random(w)
        conn: psycopg.Connection | None = None
        while time.monotonic() < self.deadline:
            action = "connect"
            try:
                if conn is None:
                    conn = psycopg.connect(self.router.dsn("carol", application_name=f"{APP}{w}"),
                                           autocommit=True, prepare_threshold=0)
                    conn.execute(f"SET mixed.w = 'p{w}'")
                action = rnd.choice(["settings", "pipeline", "commit"])
                self.actions["psycopg " + action] += 1
                if action == "settings":
                    got = conn.execute("SELECT current_setting('mixed.w')").fetchone()
                    if got != (f"p{w}",):
                        self.wrong.append(f"psycopg client {w} sees another session's settings: {got}")
                elif action == "pipeline":
                    with conn.pipeline():
                        cursors = [conn.execute("SELECT %s::int + 1", (i,)) for i in range(5)]
                    got = [c.fetchone()[0] for c in cursors]
                    if got != [1, 2, 3, 4, 5]:
                        self.wrong.append(f"psycopg client {w}: pipeline gave {got}")
                else:
                    with conn.transaction():
                        conn.execute("SELECT count(*) FROM mixed WHERE w = %s", (w,))
            except psycopg.Error as exc:
                self.note_error(f"psycopg client {w} ({action})", exc)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


def terminate_backends(cluster: Cluster, deadline: float, count: Counter) -> None:
    """Every 100 ms, one of the router's server backends on a random node."""
    rnd = random.Random(7)
    while time.monotonic() < deadline:
        node = rnd.choice(cluster.nodes)
        killed = cluster.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = 'app' AND application_name LIKE '{APP}%' ORDER BY random() LIMIT 1",
            node=node,
        ).strip()
        count["terminated"] += killed == "t"
        time.sleep(0.1)  # the pace of the terminations, not a synchronisation


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_mixed_clients_while_backends_are_terminated(cluster: Cluster, pool_mode: str, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="pgrouter")
    cluster.psql("DROP TABLE IF EXISTS mixed; CREATE TABLE mixed (w int, n int)", dbname="app")
    cluster.wait_replay()
    # Session mode: a server connection per client (and one more, for a client that
    # reconnects while its old one is being reset).
    pool_size = 3 if pool_mode == "transaction" else WORKERS + PSYCOPG_WORKERS + 2
    router = RouterThread(Settings(**router_config(
        cluster, split=True, pool_mode=pool_mode, pool_size=pool_size, max_prepared_statements=16,
    )))
    router.start()
    try:
        router.wait_for(lambda r: len(r.splits["main"].topology.eligible_replicas()) == 2,
                        timeout=20, what="both replicas eligible")
        deadline = time.monotonic() + LOAD_SECONDS
        load = Load(router, deadline)
        killer = threading.Thread(target=terminate_backends, args=(cluster, deadline, load.actions), daemon=True)
        others = [threading.Thread(target=load.psycopg_client, args=(100 + i,), daemon=True) for i in range(PSYCOPG_WORKERS)]
        for t in [killer, *others]:
            t.start()

        async def clients() -> None:
            await asyncio.wait_for(asyncio.gather(*(load.asyncpg_client(w) for w in range(WORKERS))), 60)

        def waiting_clients(r) -> list:
            return [(c.peer, len(c._held), c.server and c.server.node) for c in r.clients.values()]

        try:
            asyncio.run(clients())
        except TimeoutError:
            raise AssertionError(f"asyncpg clients never got a reply: {router.call(waiting_clients)}") from None
        for t in [killer, *others]:
            t.join(30)
        stuck = [t.name for t in others if t.is_alive()]
        assert not stuck, f"psycopg clients never got a reply: {router.call(waiting_clients)}"
        print(f"actions {dict(load.actions)}; connections lost {dict(load.lost)}")
        assert load.wrong == []
        assert load.actions["terminated"] > 10 and sum(load.lost.values()) > 0, "nothing was terminated"
        assert all(load.actions[a] > 10 for a in ("settings", "write", "prepared", "cancel", "abandon", "copy", "pin"))
        # A client gone mid-transaction: its row was rolled back, every time.
        assert cluster.psql("SELECT count(*) FROM mixed WHERE n = -1", dbname="app").strip() == "0"
        # Every client has left: no server connection is still in use or waited for.
        router.wait_for(
            lambda r: all(p.stats()["active"] == 0 and p.stats()["waiting"] == 0 for p in r.pools.pools.values()),
            what="every server connection back in its pool",
        )
        for node in cluster.nodes:
            busy = cluster.psql(
                f"SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{APP}%' AND state <> 'idle'",
                node=node,
            ).strip()
            assert busy == "0", f"{busy} backends of the router not idle on {node.port}"
        # Nothing went wrong inside the router either (a failed background task, or an
        # exception in a protocol callback, which its loop logs as asyncio's). The router's
        # thread only: the clients' asyncpg futures in this process may log as they fail.
        assert [
            r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.threadName == "pgrouter"
        ] == []
    finally:
        router.stop()
