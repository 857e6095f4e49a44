"""The admin console: ``psql -U <admin> pgrouter -c 'SHOW POOLS'``, as PgBouncer's console
database answers its operators, next to the HTTP API.

A user named in ``admin_console_users`` (a ``[users]`` login of the settings file, checked as
usual) who connects to the database ``pgrouter`` gets this session instead of a pool. It
speaks the simple query protocol (psql, ``psycopg``'s ``execute()`` without parameters) and
answers each command itself, from this process's state (with several workers, SHOW POOLS,
CLIENTS and SERVERS ask every worker and add a `worker` column; SHOW STATS, STATS_TOTALS,
STATS_AVERAGES, TOTALS, LISTS, DATABASES and NODES add every worker's figures up; SHOW CONFIG
tells the whole router's settings; the rest answer for the worker the connection landed on):

    SHOW POOLS    SHOW CLIENTS    SHOW SERVERS    SHOW NODES    SHOW DATABASES
    SHOW CONFIG   SHOW USERS      SHOW VERSION    SHOW HELP     SHOW LISTS    SHOW STATE
    SHOW STATS    SHOW STATS_TOTALS   SHOW STATS_AVERAGES   SHOW TOTALS
                  (PgBouncer's figures per database clients name: router/stats/traffic.py)
    RELOAD        (re-read the settings file, as SIGHUP; every worker)
    SHUTDOWN      (stop as on SIGTERM: running transactions get shutdown_timeout)
    PAUSE [db]    (new transactions of the database, or of every client, wait; answered once
                  none holds a server connection)
    RESUME [db]   (they go on; also after KILL)
    KILL db       (its clients are disconnected and its server connections closed at once;
                  new transactions wait for RESUME)
    KILL_CLIENT id  (one client, by SHOW CLIENTS' id: the process id it was given at login,
                  which drivers report as the backend's; its running query is cancelled)
    DISABLE db    (new logins to it are refused, 55000)   ENABLE db   (they are let in again)
    RECONNECT [db]  (each server connection is closed once released; idle ones now)
    WAIT_CLOSE [db] (answered once those are closed)

Results are text columns. Anything else gets 42601 naming the commands; an extended-protocol
message gets 0A000 (and what follows it is skipped up to its Sync), as the console has no
statements to prepare.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from pydantic import SecretStr
from pydantic_core import PydanticUndefined

from router.protocol import messages as m
from router.protocol.errors import ProtocolError, SQLState
from router.protocol.framing import MessageReader
from router.stats.traffic import TOTALS, TrafficRow, merge_rows

if TYPE_CHECKING:
    from router.app import Router
    from router.frontend.client import ClientConnection

log = logging.getLogger("pgrouter.console")

CONSOLE_DATABASE = "pgrouter"
# Messages of the extended query protocol: the first fails with 0A000, the rest wait for Sync.
_EXTENDED = frozenset(b"PBDECHF")
_COMMAND = re.compile(r"\s*(show\s+\w+|reload|shutdown)\s*;?\s*", re.IGNORECASE)
_DB_COMMAND = re.compile(
    r'\s*(pause|resume|kill_client|kill|disable|enable|reconnect|wait_close)(?:\s+(\w+|"[^"]+"))?\s*;?\s*',
    re.IGNORECASE,
)
_NEEDS_NAME = frozenset({"KILL", "DISABLE", "ENABLE"})
_NOT_AN_ID = re.compile(r"\D")
_HELP = (
    "SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS", "SHOW NODES", "SHOW DATABASES", "SHOW CONFIG", "SHOW VERSION",
    "SHOW USERS", "SHOW HELP", "SHOW STATS", "SHOW STATS_TOTALS", "SHOW STATS_AVERAGES", "SHOW TOTALS", "SHOW LISTS",
    "SHOW STATE",
    "RELOAD", "SHUTDOWN", "PAUSE [db]", "RESUME [db]", "KILL db", "KILL_CLIENT id", "DISABLE db", "ENABLE db",
    "RECONNECT [db]", "WAIT_CLOSE [db]",
)  # fmt: skip
# Settings SHOW CONFIG leaves out: tables of their own (SHOW DATABASES, SHOW NODES), and the
# users', which hold password verifiers.
_NOT_IN_CONFIG = frozenset({"clusters", "databases", "users"})
# What psql and libpq expect to hear at login; server_version says what answers.
_GREETING_PARAMETERS = {
    "client_encoding": "UTF8",
    "server_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
}


def router_version() -> str:
    try:
        return version("pgrouter")
    except PackageNotFoundError:
        return "unknown"


def greeting(cancel_pid: int, cancel_key: int) -> bytes:
    """AuthenticationOk, the ParameterStatus block, BackendKeyData and ReadyForQuery."""
    out = bytearray(m.auth_ok())
    for name, value in {**_GREETING_PARAMETERS, "server_version": f"{router_version()}/pgrouter"}.items():
        out += m.parameter_status(name, value)
    out += m.backend_key_data(cancel_pid, cancel_key)
    out += m.ready_for_query(m.IDLE)
    return bytes(out)


def _table(columns: list[str], rows: list[list[object]]) -> bytes:
    out = bytearray(m.row_description(columns))
    for row in rows:
        out += m.data_row([None if value is None else str(value) for value in row])
    out += m.command_complete("SHOW")
    return bytes(out)


Rows = tuple[list[str], list[list[object]]]  # a table: its columns and rows


def _pools(router: Router, now: float) -> Rows:
    rows = []
    for pool in router.pools.pools.values():
        key, stats = pool.key, pool.stats()
        rows.append(
            [key.dbname, key.user, key.host, key.port, pool.settings.mode, pool.settings.size, stats["servers"],
             stats["active"], stats["idle"], stats["connecting"], stats["waiting"],
             ", ".join(f"{cap.setting} {cap.used()}/{cap.limit}" for cap in pool.caps) or None,
             _reserve(pool)]
        )  # fmt: skip
    columns = ["database", "user", "host", "port", "mode", "size", "servers", "active", "idle", "connecting", "waiting",
               "caps", "reserve"]  # fmt: skip
    return columns, rows


def _reserve(pool) -> str | None:
    """reserve_pool_size: connections beyond the pool's size now / the reserve."""
    reserve = pool.settings.reserve_size
    if not reserve:
        return None
    beyond = max(0, len(pool.servers) + pool.connecting - pool.settings.size)
    return f"{beyond}/{reserve}"


def _clients(router: Router, now: float) -> Rows:
    rows = []
    for client in router.clients.values():
        state = "active" if client.server is not None else "waiting" if client._waiting_on is not None else "idle"
        tenant = client.tenant.tenant_id if client.tenant is not None else None
        since = f"{now - client.logged_in_at:.0f}" if client.logged_in_at else None
        rows.append(
            [client.user, client.database, tenant, client.peer, state, "on" if client.tls else "off",
             ", ".join(sorted(client.pins)), since, client.cancel_pid]
        )  # fmt: skip
    return ["user", "database", "tenant", "address", "state", "tls", "pinned", "connected_seconds", "id"], rows


def _servers(router: Router, now: float) -> Rows:
    rows = []
    for pool in router.pools.pools.values():
        for server in pool.servers:
            client = server.client
            rows.append(
                [pool.name, server.backend_pid, "active" if client is not None else "idle",
                 f"{client.user}@{client.peer}" if client is not None else None, f"{now - server.created_at:.0f}",
                 "yes" if server.close_needed else "no"]
            )  # fmt: skip
    return ["pool", "backend_pid", "state", "client", "age_seconds", "close_needed"], rows


# What each worker holds for itself: with several, the console asks every one and adds a
# `worker` column (ConsoleSession._answer_over_workers).
PER_WORKER = {"SHOW POOLS": _pools, "SHOW CLIENTS": _clients, "SHOW SERVERS": _servers}

TOTAL_COLUMNS = ["total_xact_count", "total_query_count", "total_received", "total_sent", "total_xact_time",
                 "total_query_time", "total_wait_time"]  # fmt: skip
AVERAGE_COLUMNS = ["avg_xact_count", "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time",
                   "avg_wait_time"]  # fmt: skip


def _traffic(router: Router, now: float) -> Rows:
    """This process's SHOW STATS figures, unrounded: each database's totals, how much they
    grew in the last closed period, and its length (TrafficRow)."""
    rows = [[row.database, *row.totals, *row.delta, row.seconds] for row in traffic_rows(router)]
    return ["database", *TOTALS, *(f"period_{name}" for name in TOTALS), "period_seconds"], rows


def traffic_rows(router: Router) -> list[TrafficRow]:
    return [TrafficRow.of(name, traffic) for name, traffic in sorted(router.pools.traffic.items())]


def _traffic_row(raw: list) -> TrafficRow:
    k = len(TOTALS)
    return TrafficRow(raw[0], raw[1 : 1 + k], raw[1 + k : 1 + 2 * k], raw[1 + 2 * k])


def _list_counts(router: Router, now: float) -> Rows:
    """SHOW LISTS' items that each worker counts for itself (added up over workers)."""
    pools = router.pools.pools.values()
    rows = [
        ["pools", len(pools)],
        ["used_clients", len(router.clients)],  # logged in to a database
        ["login_clients", max(0, router.client_count - len(router.clients) - router.console_sessions)],
        ["console_clients", router.console_sessions],
        ["used_servers", sum(len(pool.servers) for pool in pools)],
    ]
    return ["list", "items"], rows


def _connections(router: Router, now: float) -> Rows:
    """Server connections the pools of each [databases] entry hold in this process."""
    rows = [[name, sum(len(pool.servers) for pool in router.database_pools(name))] for name in router.settings.databases]
    return ["name", "current_connections"], rows


def _in_flight(router: Router, now: float) -> Rows:
    """Transactions this process runs on each monitored node now."""
    rows = [[name, node.host, node.port, node.in_flight] for name, split in router.splits.items()
            for node in split.topology.nodes]  # fmt: skip
    return ["cluster", "host", "port", "in_flight"], rows


# Figures that each worker keeps and the console adds up: merged, not listed per worker.
SUMMED = {"TRAFFIC": _traffic, "LISTS": _list_counts, "CONNECTIONS": _connections, "IN_FLIGHT": _in_flight}


def worker_rows(router: Router, command: str) -> Rows:
    """This process's rows of a PER_WORKER command or SUMMED table (the control socket's
    CONSOLE request)."""
    return (PER_WORKER.get(command) or SUMMED[command])(router, time.monotonic())


def _summed(everyone: dict[int, list | None]) -> dict[tuple, int]:
    """SUMMED rows ``[key..., n]`` of every worker that answered, n added up by key (in the
    order the keys first come)."""
    totals: dict[tuple, int] = {}
    for rows in everyone.values():
        for *key, n in rows or ():
            totals[tuple(key)] = totals.get(tuple(key), 0) + n
    return totals


def _stats(router: Router, command: str, everyone: dict[int, list | None]) -> bytes:
    """SHOW STATS, STATS_TOTALS, STATS_AVERAGES and TOTALS."""
    traffic = merged_traffic(everyone)
    if command == "SHOW TOTALS":
        whole = merge_rows([[TrafficRow("", row.totals, row.delta, row.seconds) for row in traffic]])
        values = whole[0].total_columns() + whole[0].average_columns() if whole else [0] * 2 * len(TOTALS)
        return _table(["name", "value"], [list(pair) for pair in zip(TOTAL_COLUMNS + AVERAGE_COLUMNS, values, strict=True)])
    totals, averages = command != "SHOW STATS_AVERAGES", command != "SHOW STATS_TOTALS"
    columns = ["database", *(TOTAL_COLUMNS if totals else []), *(AVERAGE_COLUMNS if averages else [])]
    rows = [
        [row.database, *(row.total_columns() if totals else []), *(row.average_columns() if averages else [])]
        for row in traffic
    ]
    return _table(columns, rows)


def _lists(router: Router, command: str, everyone: dict[int, list | None]) -> bytes:
    counts = [[item, n] for (item,), n in _summed(everyone).items()]
    rows = [["databases", len(router.settings.databases)], ["users", len(router.settings.users)], *counts]
    return _table(["list", "items"], rows)


def _nodes(router: Router, command: str, everyone: dict[int, list | None]) -> bytes:
    """The monitored nodes as this process's monitor sees them, with every worker's
    transactions in flight."""
    in_flight = _summed(everyone)
    columns = ["cluster", "host", "port", "role", "healthy", "eligible", "lag_seconds", "lag_bytes", "in_flight"]
    rows = []
    for name, split in router.splits.items():
        for node in split.topology.nodes:
            status = {"cluster": name, **node.status(), "in_flight": in_flight.get((name, node.host, node.port), 0)}
            rows.append([status[c] for c in columns])
    return _table(columns, rows)


def _databases(router: Router, command: str, everyone: dict[int, list | None]) -> bytes:
    """The settings file's databases: where each is served and how many server connections
    its pools hold now, in every worker (tenants of the registry are in the admin API's /tenants)."""
    current = _summed(everyone)
    rows = []
    for name, db in router.settings.databases.items():
        cluster = router.settings.clusters[db.cluster]
        rows.append(
            [name, db.cluster, cluster.primary.host, cluster.primary.port, len(cluster.replicas), db.dbname or name,
             db.server_user, db.pool_size or router.settings.pool_size, db.pool_mode or router.settings.pool_mode,
             current.get((name,), 0), "yes" if name in router.db_gates or "" in router.db_gates else "no",
             "yes" if name in router.disabled_databases else "no"]
        )  # fmt: skip
    columns = ["name", "cluster", "host", "port", "replicas", "database", "force_user", "pool_size", "pool_mode",
               "current_connections", "paused", "disabled"]  # fmt: skip
    return _table(columns, rows)


# Commands answered from figures every worker keeps, added up: the SUMMED table each needs,
# and what makes the reply of it.
GATHERED = {
    "SHOW STATS": ("TRAFFIC", _stats),
    "SHOW STATS_TOTALS": ("TRAFFIC", _stats),
    "SHOW STATS_AVERAGES": ("TRAFFIC", _stats),
    "SHOW TOTALS": ("TRAFFIC", _stats),
    "SHOW LISTS": ("LISTS", _lists),
    "SHOW NODES": ("IN_FLIGHT", _nodes),
    "SHOW DATABASES": ("CONNECTIONS", _databases),
}


def gathered_reply(router: Router, command: str, everyone: dict[int, list | None]) -> bytes:
    """A GATHERED command's reply from each worker's rows of its table (``every_worker``)."""
    return _silent_workers(everyone) + GATHERED[command][1](router, command, everyone)


def _command(sql: str) -> str | None:
    match = _COMMAND.fullmatch(sql)
    return " ".join(match.group(1).upper().split()) if match else None


def _config_value(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, SecretStr):
        return "********"
    if isinstance(value, list):
        return ", ".join(_config_value(item) or "" for item in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _config(router: Router) -> bytes:
    """Each setting with its value and default, and whether a reload changes it (changeable)
    or it needs a restart, as PgBouncer's SHOW CONFIG. Secrets show as ********. With
    workers, the whole router's values (each worker holds its part of the limits)."""
    from router.app import LIVE_SETTINGS

    settings = router.configured_settings
    rows = []
    for key, field in type(settings).model_fields.items():
        if key in _NOT_IN_CONFIG:
            continue
        default = None if field.default is PydanticUndefined else field.default
        rows.append(
            [key, _config_value(getattr(settings, key)), _config_value(default), "yes" if key in LIVE_SETTINGS else "no"]
        )
    return _table(["key", "value", "default", "changeable"], rows)


async def _reload(router: Router) -> bytes:
    """RELOAD: this process re-reads the settings file, and with workers every other one too
    (over the control sockets, as POST /reload)."""
    if router.config_path is None:
        return m.error_response(
            SQLState.OBJECT_NOT_IN_PREREQUISITE_STATE, "no settings file to reload: the router was not started from one"
        )
    result = router.reload_file()
    if "error" in result:
        return m.error_response(SQLState.CONFIG_FILE_ERROR, str(result["error"]))
    if router.worker is not None:
        from router.workers.control import reload_siblings

        failed = [a["error"] for a in (await reload_siblings(router.worker)).values() if "error" in a]
        if failed:
            return m.error_response(SQLState.CONFIG_FILE_ERROR, "; ".join(failed))
    notice = f"applied: {', '.join(result['applied']) or 'nothing'}; needs a restart: {', '.join(result['restart_required']) or 'nothing'}"
    return m.notice_response(SQLState.SUCCESSFUL_COMPLETION, notice) + m.command_complete("RELOAD")


def _shutdown(router: Router) -> bytes:
    """SHUTDOWN: the router stops as on SIGTERM (readiness off, no new connections, running
    transactions get shutdown_timeout), every worker with it: the signal goes to the
    supervisor, which passes it on."""
    if router.config_path is None:
        return m.error_response(
            SQLState.OBJECT_NOT_IN_PREREQUISITE_STATE, "no process to stop: the router was not started by pgrouter run"
        )
    target = os.getppid() if router.worker is not None else os.getpid()
    log.warning("SHUTDOWN from the admin console: stopping")
    # After this reply is written: the signal handler runs in the loop, later.
    asyncio.get_running_loop().call_soon(os.kill, target, signal.SIGTERM)
    return m.command_complete("SHUTDOWN")


def _users(router: Router) -> bytes:
    """The settings file's logins (never their secrets), as PgBouncer's SHOW USERS lists its."""
    console = set(router.settings.admin_console_users)
    rows = [
        [name, str(user.auth), ", ".join(str(net) for net in user.allowed_cidrs) or None, "yes" if name in console else "no"]
        for name, user in sorted(router.settings.users.items())
    ]
    return _table(["name", "auth", "allowed_cidrs", "console"], rows)


def _state(router: Router) -> bytes:
    """PgBouncer's SHOW STATE, of the worker answering: ``paused`` after a PAUSE of every
    client (a database's own PAUSE shows in SHOW DATABASES), ``suspended`` never (there is no
    SUSPEND: it serves PgBouncer's online restart, which a restart with SO_REUSEPORT workers
    replaces), ``active`` when neither is so and the router is not shutting down."""
    paused = "" in router.db_gates
    rows = [
        ["active", "no" if paused or router.draining else "yes"],
        ["paused", "yes" if paused else "no"],
        ["suspended", "no"],
    ]
    return _table(["key", "value"], rows)


def answer(router: Router, sql: str) -> bytes:
    """The reply to one Query of the console (without its ReadyForQuery)."""
    command = _command(sql)
    if command in PER_WORKER:
        return _table(*worker_rows(router, command))
    if command in GATHERED:
        return gathered_reply(router, command, {0: worker_rows(router, GATHERED[command][0])[1]})
    if command == "SHOW CONFIG":
        return _config(router)
    if command == "SHOW VERSION":
        return _table(["version"], [[f"pgrouter {router_version()}"]])
    if command == "SHOW HELP":
        return _table(["command"], [[name] for name in _HELP])
    if command == "SHOW USERS":
        return _users(router)
    if command == "SHOW STATE":
        return _state(router)
    if command == "SHUTDOWN":
        return _shutdown(router)
    if not sql.strip(" \t\n\r;"):
        return m.empty_query_response()
    return m.error_response(
        SQLState.SYNTAX_ERROR, f"unknown admin console command: {sql.strip()[:60]!r}", hint="SHOW HELP lists the commands."
    )


async def every_worker(router: Router, table: str) -> dict[int, list | None]:
    """Each worker's rows of a PER_WORKER or SUMMED ``table`` by worker index, this one's
    included (None: that worker did not answer); without workers, this process's."""
    from router.workers.control import sibling_console_rows

    own = worker_rows(router, table)[1]
    worker = router.worker
    if worker is None:
        return {0: own}
    everyone = {worker.index: own, **await sibling_console_rows(worker, table)}
    return {index: everyone[index] for index in sorted(everyone)}


def _silent_workers(everyone: dict[int, list | None]) -> bytes:
    """A NOTICE for each worker that did not answer (its rows are left out)."""
    out = bytearray()
    for index, rows in everyone.items():
        if rows is None:
            out += m.notice_response(SQLState.SUCCESSFUL_COMPLETION, f"worker {index} did not answer")
    return bytes(out)


def merged_traffic(everyone: dict[int, list | None]) -> list[TrafficRow]:
    """The SUMMED table TRAFFIC of every worker that answered, one row per database."""
    return merge_rows([[_traffic_row(raw) for raw in rows] for rows in everyone.values() if rows is not None])


class ConsoleSession(asyncio.Protocol):
    """One logged-in console connection: takes over the client's transport."""

    def __init__(self, router: Router, client: ClientConnection, transport: asyncio.Transport) -> None:
        self.router = router
        self.client = client
        self.transport = transport
        self.reader = MessageReader(max_size=1 << 20)
        self.extended = False  # an extended-protocol message failed: skipping up to the Sync
        # A SHOW asking the other workers (_answer_over_workers): later messages wait for it.
        self._busy: asyncio.Task | None = None

    def start(self, rest: bytes) -> None:
        self.router.console_sessions += 1
        self.transport.set_protocol(self)
        self.transport.write(greeting(self.client.cancel_pid, self.client.cancel_key))
        if rest:
            self.data_received(rest)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        if self._busy is None:
            self._process()

    def _process(self) -> None:
        """Answer every whole message received, in order."""
        out = bytearray()
        try:
            while (message := self.reader.next()) is not None:
                kind, body = message
                if kind == b"X":
                    if out:
                        self.transport.write(bytes(out))
                    self.transport.close()
                    return
                if kind == b"S":
                    self.extended = False
                    out += m.ready_for_query(m.IDLE)
                elif self.extended:
                    continue  # skipped up to the Sync, as a server skips after an error
                elif kind == b"Q":
                    sql = m.parse_query(body)
                    command = _command(sql)
                    db_command = _DB_COMMAND.fullmatch(sql)
                    if db_command is not None or command == "RELOAD" or (
                        self.router.worker is not None and (command in PER_WORKER or command in GATHERED)
                    ):
                        # Answered in a task (it waits, or asks the other workers); what
                        # follows stays in the reader until it is done.
                        if out:
                            self.transport.write(bytes(out))
                        if db_command is not None:
                            verb, name = db_command.group(1).upper(), (db_command.group(2) or "").strip('"')
                            coro = self._database_command(verb, name)
                        elif command == "RELOAD":
                            verb, coro = command, _reload(self.router)
                        elif command in GATHERED:
                            verb, coro = command, self._gathered(command)
                        else:
                            verb, coro = command, self._answer_over_workers(command)
                        self._busy = asyncio.get_running_loop().create_task(self._in_order(verb, coro))
                        return
                    out += answer(self.router, sql) + m.ready_for_query(m.IDLE)
                elif kind[0] in _EXTENDED:
                    # As a server fails an extended-protocol message: the error at once (a
                    # client may wait for it after a Flush), the rest skipped up to the Sync.
                    self.extended = True
                    out += m.error_response(
                        SQLState.FEATURE_NOT_SUPPORTED, "the admin console speaks the simple query protocol only"
                    )
                else:
                    raise ProtocolError(f"unexpected message type {kind!r} in the admin console")
        except ProtocolError as exc:
            log.warning("admin console %s@%s: %s; closing", self.client.user, self.client.peer, exc.message)
            out += m.error_response(exc.sqlstate, exc.message, severity="FATAL")
            self.transport.write(bytes(out))
            self.transport.close()
            return
        if out:
            self.transport.write(bytes(out))

    async def _in_order(self, command: str, reply) -> None:
        """Send what the coroutine ``reply`` answers, then go on with the messages after it."""
        try:
            out = await reply
        except Exception as exc:  # the session goes on: a bug here must not stall it
            log.exception("admin console: %s failed", command)
            out = m.error_response(SQLState.INTERNAL_ERROR, f"{command} failed: {exc}")
        self._busy = None
        if not self.transport.is_closing():
            self.transport.write(out + m.ready_for_query(m.IDLE))
            self._process()

    async def _answer_over_workers(self, command: str) -> bytes:
        """With workers: every worker's rows of a PER_WORKER table, each with its index in a
        first column `worker`; a NOTICE names a worker that did not answer."""
        columns, _ = worker_rows(self.router, command)
        everyone = await every_worker(self.router, command)
        merged = [[index, *row] for index, rows in everyone.items() if rows is not None for row in rows]
        return _silent_workers(everyone) + _table(["worker", *columns], merged)

    async def _gathered(self, command: str) -> bytes:
        """With workers: a GATHERED command's reply from every worker's figures added up; a
        NOTICE names a worker that did not answer (its figures are missing)."""
        return gathered_reply(self.router, command, await every_worker(self.router, GATHERED[command][0]))

    def _unknown_database(self, name: str) -> bytes | None:
        if self.router.known_database(name):
            return None
        return m.error_response(SQLState.INVALID_CATALOG_NAME, f'no database "{name}" in the settings file')

    async def _database_command(self, verb: str, name: str) -> bytes:
        if verb == "KILL_CLIENT":
            return await self._kill_client(name)
        if verb in _NEEDS_NAME and not name:
            return m.error_response(SQLState.SYNTAX_ERROR, f"{verb} needs a database name")
        refused = self._unknown_database(name)
        if refused is not None:
            return refused
        if verb == "PAUSE":
            return await self._pause(name)
        if verb == "RESUME":
            return await self._resume(name)
        if verb == "WAIT_CLOSE":
            left = await self.router.wait_close_everywhere(name)
            if left:
                warning = (
                    f"{left} server connections RECONNECT marked are still in use after tenant_drop_timeout "
                    f"({self.router.settings.tenant_drop_timeout:g}s); they close when released"
                )
                return m.notice_response("01000", warning, severity="WARNING") + m.command_complete(verb)
            return m.command_complete(verb)
        count = await self.router.database_command_everywhere(verb, name)
        out = b""
        if verb == "KILL":
            out = m.notice_response(
                SQLState.SUCCESSFUL_COMPLETION, f"{count} clients disconnected; new transactions wait for RESUME"
            )
        elif verb == "RECONNECT":
            out = m.notice_response(
                SQLState.SUCCESSFUL_COMPLETION, f"{count} server connections to close: idle ones now, the rest when released"
            )
        return out + m.command_complete(verb)

    async def _kill_client(self, name: str) -> bytes:
        """KILL_CLIENT id: the client whose id (SHOW CLIENTS) it is, on whichever worker,
        is disconnected with 57P01 (PgBouncer's command)."""
        if not name or _NOT_AN_ID.search(name) or len(name) > 10:
            return m.error_response(SQLState.SYNTAX_ERROR, "KILL_CLIENT needs a client id: the id column of SHOW CLIENTS")
        if not await self.router.database_command_everywhere("KILL_CLIENT", name):
            return m.error_response(SQLState.UNDEFINED_OBJECT, f"no client with id {name}")
        return m.command_complete("KILL_CLIENT")

    async def _pause(self, name: str) -> bytes:
        """PAUSE [db]: new transactions of the database's clients (of every client, without a
        name) wait; answered once none holds a server connection, in every worker, or after
        tenant_drop_timeout with a WARNING saying how many still do."""
        busy = await self.router.pause_database_everywhere(name)
        if not busy:
            return m.command_complete("PAUSE")
        warning = (
            f"{busy} clients still hold server connections after tenant_drop_timeout "
            f"({self.router.settings.tenant_drop_timeout:g}s); their next transactions wait"
        )
        return m.notice_response("01000", warning, severity="WARNING") + m.command_complete("PAUSE")

    async def _resume(self, name: str) -> bytes:
        """RESUME [db]: the database's waiting transactions go on (without a name: every
        paused database's), in every worker."""
        await self.router.resume_database_everywhere(name)
        return m.command_complete("RESUME")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._busy is not None:
            self._busy.cancel()
        self.router.console_sessions -= 1
        self.router.forget_client(self.client)
