"""The admin console (router/admin/console.py): the database "pgrouter" for the logins named in
admin_console_users, driven with unmodified psql, psycopg and asyncpg."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest

from router.protocol import messages as m
from router.protocol.framing import frame
from tests.cluster import Cluster
from tests.harness import RouterThread
from tests.rawclient import RawClient


def psql(dsn: str, *commands: str) -> subprocess.CompletedProcess:
    argv = ["psql", "-X", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1", dsn]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def rows(out: str) -> list[list[str]]:
    """psql -A output without its "(N rows)" footer, as lists of fields (header first)."""
    return [line.split("|") for line in out.splitlines() if line and not line.startswith("(")]


@pytest.fixture
def console_router(start_router) -> RouterThread:
    return start_router(split=True, admin_console_users=["alice"], pool_size=2, admin_token="console-test-token")


def test_show_commands_tell_pools_clients_servers_and_nodes(console_router: RouterThread, cluster: Cluster) -> None:
    console = console_router.dsn("alice", "alice-pw", "pgrouter")
    with psycopg.connect(console_router.dsn("carol"), autocommit=True) as busy:
        busy.execute("BEGIN")
        pid = busy.execute("SELECT pg_backend_pid()").fetchone()[0]  # on the primary, held
        result = psql(console, "SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS")
        assert result.returncode == 0, result.stderr
        busy.execute("COMMIT")
    lines = rows(result.stdout)
    pools_header = ["database", "user", "host", "port", "mode", "size", "servers", "active", "idle", "connecting",
                    "waiting", "caps", "reserve"]  # fmt: skip
    assert lines[0] == pools_header
    pools = {(r[0], r[2], r[3]): r for r in lines[1:] if len(r) == len(pools_header)}
    primary = pools[("app", cluster.primary.host, str(cluster.primary.port))]
    assert primary[4:] == ["transaction", "2", "1", "1", "0", "0", "0", "", ""]  # caps, reserve: none (NULL)
    clients_at = lines.index(["user", "database", "tenant", "address", "state", "tls", "pinned", "connected_seconds", "id"])
    clients = [r for r in lines[clients_at + 1 :] if len(r) == 9]
    assert [(r[0], r[1], r[4], r[5]) for r in clients] == [("carol", "app", "active", "off")]
    servers_at = lines.index(["pool", "backend_pid", "state", "client", "age_seconds", "close_needed"])
    servers = [r for r in lines[servers_at + 1 :] if len(r) == 6]
    assert [(r[1], r[2]) for r in servers if r[3]] == [(str(pid), "active")]
    assert [r for r in servers if r[3]][0][3].startswith("carol@127.0.0.1:")

    console_router.wait_for(
        lambda r: sum(n.eligible for split in r.splits.values() for n in split.topology.nodes) == 2, what="replicas"
    )
    with psycopg.connect(console, autocommit=True) as conn:  # psycopg: simple protocol without parameters
        cur = conn.execute("show nodes;")
        assert [d.name for d in cur.description][:4] == ["cluster", "host", "port", "role"]
        nodes = {(row[2], row[3], row[5]) for row in cur.fetchall()}
        assert nodes == {
            (str(cluster.primary.port), "primary", "False"),
            *((str(r.port), "replica", "True") for r in cluster.replicas),
        }
        assert conn.execute("SHOW VERSION").fetchone()[0].startswith("pgrouter ")
        assert ["SHOW POOLS"] in [list(row) for row in conn.execute("SHOW HELP").fetchall()]


def test_show_config_and_databases(console_router: RouterThread, cluster: Cluster) -> None:
    """SHOW CONFIG: every setting's value and default and whether a reload changes it, with
    secrets masked and the users' verifiers left out. SHOW DATABASES: the settings file's
    databases, where they are served and the server connections their pools hold."""
    console = console_router.dsn("alice", "alice-pw", "pgrouter")
    with psycopg.connect(console_router.dsn("carol"), autocommit=True) as busy:
        busy.execute("BEGIN")
        busy.execute("SELECT 1")  # one server connection held on the primary
        result = psql(console, "SHOW CONFIG", "SHOW DATABASES", "SHOW POOLS")
        busy.execute("COMMIT")
    assert result.returncode == 0, result.stderr
    lines = rows(result.stdout)
    assert lines[0] == ["key", "value", "default", "changeable"]
    config = {r[0]: r[1:] for r in lines[1:] if len(r) == 4}
    assert config["pool_size"] == ["2", "20", "yes"]
    assert config["listen_port"] == ["0", "6432", "no"]  # as configured: any free port
    assert config["pool_mode"] == ["transaction", "transaction", "no"]
    assert config["tcp_keepalive"] == ["on", "on", "no"]
    assert config["admin_console_users"] == ["alice", "", "yes"]  # a reload changes it
    assert config["admin_token"][0] == "********" and "console-test-token" not in result.stdout
    assert "users" not in config and "SCRAM-SHA-256$" not in result.stdout
    databases_at = lines.index(
        ["name", "cluster", "host", "port", "replicas", "database", "force_user", "pool_size", "pool_mode",
         "current_connections", "paused", "disabled"]
    )  # fmt: skip
    databases = [r for r in lines[databases_at + 1 :] if len(r) == 12]
    pools_at = lines.index(["database", "user", "host", "port", "mode", "size", "servers", "active", "idle", "connecting",
                            "waiting", "caps", "reserve"])  # fmt: skip
    servers = sum(int(r[6]) for r in lines[pools_at + 1 :] if len(r) == 13 and r[0] == "app")
    assert servers >= 1
    assert databases == [
        ["app", "main", cluster.primary.host, str(cluster.primary.port), "2", "app", "postgres", "2", "transaction",
         str(servers), "no", "no"]
    ]  # fmt: skip


def test_pause_waits_for_running_transactions_and_resume_lets_the_waiting_go_on(
    console_router: RouterThread,
) -> None:
    """PAUSE app: new transactions of the database's clients wait; the command answers once
    no client holds a server connection. RESUME app: the waiting ones go on."""
    console = psycopg.connect(console_router.dsn("alice", "alice-pw", "pgrouter"), autocommit=True)
    busy = psycopg.connect(console_router.dsn("carol"), autocommit=True)
    later = psycopg.connect(console_router.dsn("carol"), autocommit=True)
    busy.execute("BEGIN")
    busy.execute("SELECT 1")  # holds a server connection
    paused_at: list[float] = []
    pausing = threading.Thread(target=lambda: (console.execute("PAUSE app"), paused_at.append(time.monotonic())))
    pausing.start()
    console_router.wait_for(lambda r: "app" in r.db_gates, what="the gate")
    assert pausing.is_alive(), "PAUSE answered while a transaction was running"
    committed_at = time.monotonic()
    busy.execute("COMMIT")
    pausing.join(10)
    assert paused_at and paused_at[0] >= committed_at
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(later.execute("SELECT 2").fetchone()))
    waiting.start()
    console_router.wait_for(lambda r: len(r.db_gates["app"].waiters) == 1, what="the next transaction at the gate")
    cur = console.execute("SHOW DATABASES")
    names = [d.name for d in cur.description]
    assert [row[names.index("paused")] for row in cur.fetchall()] == ["yes"]
    assert console.execute("SHOW CLIENTS").fetchall()  # the console itself is not paused
    assert console.execute("RESUME app").statusmessage == "RESUME"
    waiting.join(10)
    assert got == [(2,)]
    with pytest.raises(psycopg.errors.InvalidCatalogName, match="nosuch"):
        console.execute("PAUSE nosuch")
    for conn in (console, busy, later):
        conn.close()


def _waits_at_the_gate(router: RouterThread, conn, gate: str, console, resume: str) -> None:
    """``conn``'s next transaction waits at the console's gate ``gate`` ("": every database)
    until the console sends ``resume``, then runs."""
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(conn.execute("SELECT 3").fetchone()))
    waiting.start()
    router.wait_for(lambda r: len(r.db_gates[gate].waiters) == 1, what="the next transaction at the gate")
    console.execute(resume)
    waiting.join(10)
    assert got == [(3,)]


def test_pause_gives_up_waiting_after_tenant_drop_timeout(start_router) -> None:
    """A client that keeps its transaction open: PAUSE answers after tenant_drop_timeout with
    a WARNING counting it, and its next transaction waits like the others."""
    router = start_router(admin_console_users=["alice"], tenant_drop_timeout=0.5)
    console = psycopg.connect(router.dsn("alice", "alice-pw", "pgrouter"), autocommit=True)
    notices: list[str] = []
    console.add_notice_handler(lambda diag: notices.append(f"{diag.severity}: {diag.message_primary}"))
    holder = psycopg.connect(router.dsn("carol"), autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    assert console.execute("SHOW STATE").fetchall() == [("active", "yes"), ("paused", "no"), ("suspended", "no")]
    assert console.execute("PAUSE").statusmessage == "PAUSE"  # every database
    assert notices == ["WARNING: 1 clients still hold server connections after tenant_drop_timeout (0.5s); their next transactions wait"]
    assert console.execute("SHOW STATE").fetchall() == [("active", "no"), ("paused", "yes"), ("suspended", "no")]
    holder.execute("COMMIT")  # in the transaction: goes on
    _waits_at_the_gate(router, holder, "", console, "RESUME")
    assert console.execute("SHOW STATE").fetchall()[:2] == [("active", "yes"), ("paused", "no")]
    console.close()
    holder.close()


def _backend_alive(cluster: Cluster, pid: int) -> bool:
    return cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "1"


def _poll(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_disable_refuses_new_logins_and_enable_lets_them_in(console_router: RouterThread) -> None:
    """DISABLE app: a new login to app gets 55000, as from a database that does not allow
    connections; clients already in keep working. ENABLE app: logins work again."""
    console = psycopg.connect(console_router.dsn("alice", "alice-pw", "pgrouter"), autocommit=True)
    inside = psycopg.connect(console_router.dsn("carol"), autocommit=True)
    assert console.execute("DISABLE app").statusmessage == "DISABLE"
    with pytest.raises(psycopg.OperationalError, match='database "app" is not currently accepting connections'):
        psycopg.connect(console_router.dsn("carol"))

    async def login_sqlstate() -> str:
        with pytest.raises(asyncpg.PostgresError) as exc:
            await asyncpg.connect(console_router.dsn("carol"))
        return exc.value.sqlstate

    assert asyncio.run(login_sqlstate()) == "55000"
    assert inside.execute("SELECT 1").fetchone() == (1,)
    cur = console.execute("SHOW DATABASES")
    names = [d.name for d in cur.description]
    assert [row[names.index("disabled")] for row in cur.fetchall()] == ["yes"]
    with pytest.raises(psycopg.errors.SyntaxError, match="needs a database name"):
        console.execute("DISABLE")
    with pytest.raises(psycopg.errors.InvalidCatalogName):
        console.execute("DISABLE nosuch")
    assert console.execute("ENABLE app").statusmessage == "ENABLE"
    with psycopg.connect(console_router.dsn("carol"), autocommit=True) as again:
        assert again.execute("SELECT 2").fetchone() == (2,)
    for conn in (console, inside):
        conn.close()


def _busy_and_idle(router: RouterThread) -> tuple[psycopg.Connection, int, psycopg.Connection, int]:
    """Two clients of app: one in a transaction (holding its server connection), one between
    transactions (its server connection idle in the pool); each with its backend's pid."""
    busy = psycopg.connect(router.dsn("carol"), autocommit=True)
    idle = psycopg.connect(router.dsn("carol"), autocommit=True)
    busy.execute("BEGIN")
    pid = busy.execute("SELECT pg_backend_pid()").fetchone()[0]
    idle_pid = idle.execute("SELECT pg_backend_pid()").fetchone()[0]
    return busy, pid, idle, idle_pid


def test_kill_drops_clients_and_servers_and_holds_new_transactions(start_router, cluster: Cluster) -> None:
    """KILL app: its clients are disconnected (57P01) and its server connections closed at
    once, a transaction's included; a client that logs in afterwards waits at the gate until
    RESUME app, as after PAUSE."""
    router = start_router(admin_console_users=["alice"], pool_size=2)
    console = psycopg.connect(router.dsn("alice", "alice-pw", "pgrouter"), autocommit=True)
    notices: list[str] = []
    console.add_notice_handler(lambda diag: notices.append(diag.message_primary))
    busy, pid, idle, idle_pid = _busy_and_idle(router)
    assert console.execute("KILL app").statusmessage == "KILL"
    assert notices == ["2 clients disconnected; new transactions wait for RESUME"]
    for conn in (busy, idle):
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            conn.execute("SELECT 1")
    _poll(lambda: not _backend_alive(cluster, pid) and not _backend_alive(cluster, idle_pid), "servers closed")
    assert console.execute("SHOW CLIENTS").fetchall() == []  # gone; the console itself goes on
    later = psycopg.connect(router.dsn("carol"), autocommit=True)  # logins still work
    _waits_at_the_gate(router, later, "app", console, "RESUME app")
    for conn in (console, busy, idle, later):
        conn.close()


def test_kill_client_disconnects_one_client_and_cancels_its_query(start_router, cluster: Cluster) -> None:
    """KILL_CLIENT id (SHOW CLIENTS' id, the process id the client was given, which drivers
    report): that client gets 57P01 at once, its running query is cancelled, and the other
    client goes on. An id nobody has is 42704; anything but an id 42601."""
    router = start_router(admin_console_users=["alice"], pool_size=2)
    console = psycopg.connect(router.dsn("alice", "alice-pw", "pgrouter"), autocommit=True)
    sleeper = psycopg.connect(router.dsn("carol"), autocommit=True)
    other = psycopg.connect(router.dsn("carol"), autocommit=True)
    other.execute("SELECT 1")
    failed: list[BaseException] = []

    def sleep() -> None:
        try:
            sleeper.execute("SELECT pg_sleep(60)")
        except psycopg.Error as exc:
            failed.append(exc)

    thread = threading.Thread(target=sleep)
    thread.start()
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'"
    _poll(lambda: cluster.psql(sleeping) == "1", "the query running")
    cur = console.execute("SHOW CLIENTS")
    names = [d.name for d in cur.description]
    ids = {int(row[names.index("id")]) for row in cur.fetchall()}
    assert ids == {sleeper.info.backend_pid, other.info.backend_pid}
    assert console.execute(f"KILL_CLIENT {sleeper.info.backend_pid}").statusmessage == "KILL_CLIENT"
    thread.join(10)
    assert not thread.is_alive()
    assert len(failed) == 1 and isinstance(failed[0], psycopg.OperationalError)
    assert "terminating connection due to administrator command" in str(failed[0])
    _poll(lambda: cluster.psql(sleeping) == "0", "the query cancelled")
    assert other.execute("SELECT 2").fetchone() == (2,)
    rows_left = console.execute("SHOW CLIENTS").fetchall()
    assert [int(row[names.index("id")]) for row in rows_left] == [other.info.backend_pid]
    with pytest.raises(psycopg.errors.UndefinedObject, match=f"no client with id {sleeper.info.backend_pid}"):
        console.execute(f"KILL_CLIENT {sleeper.info.backend_pid}")
    for bad in ("KILL_CLIENT", "KILL_CLIENT carol"):
        with pytest.raises(psycopg.errors.SyntaxError, match="needs a client id"):
            console.execute(bad)
    assert other.execute("SELECT 3").fetchone() == (3,)
    for conn in (console, sleeper, other):
        conn.close()


def test_reconnect_closes_each_server_connection_once_released(start_router, cluster: Cluster) -> None:
    """RECONNECT app: an idle server connection is closed now, one in a transaction when its
    client is done with it; WAIT_CLOSE answers once none is left (here, first, with a
    WARNING after tenant_drop_timeout). Clients go on, on new server connections."""
    router = start_router(admin_console_users=["alice"], pool_size=2, tenant_drop_timeout=0.5)
    console = psycopg.connect(router.dsn("alice", "alice-pw", "pgrouter"), autocommit=True)
    notices: list[str] = []
    console.add_notice_handler(lambda diag: notices.append(f"{diag.severity}: {diag.message_primary}"))
    busy, pid, idle, idle_pid = _busy_and_idle(router)
    assert console.execute("RECONNECT app").statusmessage == "RECONNECT"
    _poll(lambda: not _backend_alive(cluster, idle_pid), "the idle server connection closed")
    assert _backend_alive(cluster, pid)
    servers = {row[1]: row[5] for row in console.execute("SHOW SERVERS").fetchall()}
    assert servers == {str(pid): "yes"}
    assert console.execute("WAIT_CLOSE app").statusmessage == "WAIT_CLOSE"
    assert notices[-1].startswith("WARNING: 1 server connections RECONNECT marked are still in use")
    assert busy.execute("SELECT pg_backend_pid()").fetchone() == (pid,)  # its transaction goes on
    busy.execute("COMMIT")
    _poll(lambda: not _backend_alive(cluster, pid), "the busy one closed once released")
    count = len(notices)
    assert console.execute("WAIT_CLOSE").statusmessage == "WAIT_CLOSE"
    assert len(notices) == count  # nothing left to wait for
    assert busy.execute("SELECT pg_backend_pid()").fetchone()[0] not in (pid, idle_pid)
    for conn in (console, busy, idle):
        conn.close()


def test_console_refuses_what_it_does_not_speak(console_router: RouterThread) -> None:
    console = console_router.dsn("alice", "alice-pw", "pgrouter")
    with psycopg.connect(console, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SyntaxError, match="SHOW HELP"):
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="no settings file"):
            conn.execute("RELOAD")  # an in-process router has no file
        assert conn.execute("SHOW VERSION").fetchone()  # the session goes on

    async def extended() -> None:
        conn = await asyncpg.connect(console)
        try:
            with pytest.raises(asyncpg.FeatureNotSupportedError, match="simple query protocol"):
                await conn.fetch("SHOW POOLS")
            assert await conn.execute("SHOW VERSION") == "SHOW"  # execute(): a simple Query
        finally:
            await conn.close()

    asyncio.run(extended())
    # Not an admin console user, or a wrong password: as for any database.
    assert "password authentication failed" in psql(console_router.dsn("alice", "wrong", "pgrouter"), "SHOW POOLS").stderr
    refused = psql(console_router.dsn("carol", None, "pgrouter"), "SHOW POOLS")
    assert refused.returncode != 0 and "pgrouter" in refused.stderr and "does not exist" in refused.stderr
    # Ordinary clients were never affected.
    with psycopg.connect(console_router.dsn("carol"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reload_from_the_console(router_process) -> None:
    proc = router_process(admin_console_users=["alice"])
    result = psql(proc.dsn("alice", "alice-pw", "pgrouter"), "RELOAD")
    assert result.returncode == 0, result.stderr
    assert "applied: nothing; needs a restart: nothing" in result.stderr  # the NOTICE
    assert result.stdout.strip() == "RELOAD"


def test_show_users_lists_the_logins_without_secrets(console_router: RouterThread) -> None:
    with psycopg.connect(console_router.dsn("alice", "alice-pw", "pgrouter"), autocommit=True) as console:
        cur = console.execute("SHOW USERS")
        assert [d.name for d in cur.description] == ["name", "auth", "allowed_cidrs", "console"]
        rows = cur.fetchall()
    assert rows == [("alice", "scram-sha-256", None, "yes"), ("bob", "md5", None, "no"), ("carol", "trust", None, "no")]


def test_shutdown_from_the_console_drains_and_exits(router_process) -> None:
    """SHUTDOWN stops the router as SIGTERM does: a transaction running then may finish, and
    the process exits 0. An in-process router (no `pgrouter run`) refuses it."""
    proc = router_process(admin_console_users=["alice"], shutdown_timeout=20)
    busy = psycopg.connect(proc.dsn("carol"))
    busy.execute("SELECT 1")  # in a transaction now
    result = psql(proc.dsn("alice", "alice-pw", "pgrouter"), "SHUTDOWN")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SHUTDOWN"
    assert busy.execute("SELECT 41 + 1").fetchone() == (42,)
    busy.commit()
    assert proc.proc.wait(20) == 0
    busy.close()


def test_shutdown_needs_a_process_of_its_own(console_router: RouterThread) -> None:
    with psycopg.connect(console_router.dsn("alice", "alice-pw", "pgrouter"), autocommit=True) as console:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not started by pgrouter run"):
            console.execute("SHUTDOWN")
        assert console.execute("SHOW VERSION").fetchone()


def test_console_follows_the_protocol_in_a_pipeline(start_router) -> None:
    """An extended-protocol message fails at once and what follows it waits for the Sync (a
    Query too, as a server skips it); a Terminate after a Query goes out after its answer."""
    router = start_router(admin_console_users=["carol"])  # a trust login of the settings file
    console = RawClient(router.port)
    assert console.login_trust("carol", "pgrouter")[-1] == (b"Z", b"I")
    parse = frame(b"P", b"\0SHOW POOLS\0\0\0")
    console.send(parse + m.query("SHOW VERSION") + m.sync() + m.query("SHOW VERSION") + m.terminate())
    replies = console.recv_until(b"Z")
    assert [t for t, _ in replies] == [b"E", b"Z"]
    assert m.parse_error_fields(replies[0][1])["C"] == "0A000"
    replies = console.recv_until(b"Z")
    assert [t for t, _ in replies] == [b"T", b"D", b"C", b"Z"]
    assert console.is_closed()
    router.wait_for(lambda r: r.client_count == 0, what="the console's place given back")
