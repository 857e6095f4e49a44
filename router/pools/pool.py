"""Server-connection pools, one per (node, database, server user).

A client takes a server connection for one transaction (transaction mode) or for its whole
session (session mode) and gives it back with ``release``. Waiters are served in arrival
order; one waiting past ``query_wait_timeout`` gets SQLSTATE 53300 naming the pool.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Protocol

from router.admin.metrics import observe_pool_wait
from router.backend.server import ServerConnection
from router.config import ChannelBinding, DatabaseConfig, PoolMode
from router.protocol import messages as m
from router.protocol.errors import RouterError, SQLState
from router.routing.verdict import ROUTER_TARGET_GUC
from router.session import set_config_sql
from router.sockopts import SocketOptions

# What PostgreSQL refuses in a startup packet, found when the router applies a client's
# startup settings at login: an unrecognized parameter, an invalid value, one the user may
# not set. (One that cannot change after connection start, 55P02, is accepted there.)
_REFUSED_AT_STARTUP = frozenset(
    {SQLState.UNDEFINED_OBJECT, SQLState.INVALID_PARAMETER_VALUE, SQLState.INSUFFICIENT_PRIVILEGE}
)
# Distinct sets of startup settings whose reported values a pool remembers.
_STARTUP_REPORTS_KEPT = 256

log = logging.getLogger("pgrouter.pool")


def is_unix_socket(host: str) -> bool:
    """A node ``host`` that is a directory (``/var/run/postgresql``), as libpq reads one: the
    server's Unix-domain socket there, ``.s.PGSQL.<port>``."""
    return host.startswith("/")


def unix_socket_path(host: str, port: int) -> str:
    return f"{host.rstrip('/')}/.s.PGSQL.{port}"


def _unchanged_for(
    mark: tuple[int, float] | None, count: int, now: float, timeout: float
) -> tuple[tuple[int, float] | None, bool]:
    """The janitor's clock for a counter: ``mark`` is (the count, when the janitor first saw
    it). Returns the new mark and whether the count has stood still for ``timeout``."""
    if mark is None or mark[0] != count:
        return (count, now), False
    if now - mark[1] >= timeout:
        return None, True
    return mark, False


@dataclass(frozen=True, slots=True)
class PoolKey:
    """What makes server connections interchangeable: the node, real database and server
    user, and the two things that differ between [databases] entries (or tenants) naming
    the same three: pool mode, and server TLS set on the entry itself ("": the global)."""

    host: str
    port: int
    dbname: str
    user: str
    mode: PoolMode = PoolMode.TRANSACTION
    tls: str = ""

    @property
    def name(self) -> str:
        """Unique among pools: the mode and TLS are named when not the defaults."""
        extras = [self.mode.value] if self.mode is not PoolMode.TRANSACTION else []
        if self.tls:
            extras.append(f"server_tls={self.tls}")
        base = f"{self.dbname}/{self.user}@{self.host}:{self.port}"
        return f"{base} ({', '.join(extras)})" if extras else base


@dataclass(slots=True)
class PoolSettings:
    size: int
    min_size: int
    mode: PoolMode
    query_wait_timeout: float
    idle_timeout: float
    lifetime: float
    connect_timeout: float
    reset_query: str
    tls: ssl.SSLContext | None
    tls_required: bool
    channel_binding: ChannelBinding
    application_name: str
    max_prepared_statements: int = 250
    socket_options: SocketOptions = ()  # router/sockopts.py: TCP keepalive
    # reserve_pool_size / reserve_pool_timeout: connections beyond ``size`` for clients that
    # have waited ``reserve_timeout`` seconds (0 for either: none).
    reserve_size: int = 0
    reserve_timeout: float = 5.0


class Waiter(Protocol):
    """Whoever waits for a server connection: a client connection, or an awaiting task."""

    def server_assigned(self, server: ServerConnection) -> None: ...
    def server_failed(self, error: RouterError) -> None: ...


class _FutureWaiter:
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future) -> None:
        self.future = future

    def server_assigned(self, server: ServerConnection) -> None:
        if self.future.done():
            # The awaiting task is gone (cancelled): hand the connection straight back.
            server.pool.release(server)
        else:
            self.future.set_result(server)

    def server_failed(self, error: RouterError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class ConnectionCap:
    """max_db_connections / max_user_connections: how many server connections the pools of
    one database (or one server user) on one node may hold together, opening ones counted.

    A pool that would open a connection past the cap waits instead. A slot goes to the pool
    whose client has waited longest: when a member pool's connection closes, when one goes
    idle while a sibling waits longer than the pool's own clients (it is closed, and the
    sibling opens one), and at once when a sibling has an idle connection to spare."""

    def __init__(self, setting: str, name: str, limit: int) -> None:
        self.setting = setting
        self.name = name
        self.limit = limit
        self.pools: list[Pool] = []

    def used(self) -> int:
        return sum(len(pool.servers) + pool.connecting for pool in self.pools)

    def full(self) -> bool:
        return self.used() >= self.limit

    def trim(self) -> None:
        """A reload lowered the limit below what the member pools hold: their idle
        connections close now, longest idle first, until the cap is kept (busy ones close
        as they are released, Pool._hand_slot_on)."""
        excess = self.used() - self.limit
        if excess <= 0:
            return
        idle = sorted(
            (server for pool in self.pools for server in pool.idle if not server.closed),
            key=lambda server: server.idle_since,
        )
        for server in idle[:excess]:
            server.pool.discard_idle(server, f"{self.setting} lowered to {self.limit} for {self.name}")

    def longest_waiting(self, exclude: Pool | None = None) -> Pool | None:
        """The member pool (other than ``exclude``) with room of its own whose oldest waiter
        queued first."""
        best, since = None, 0.0
        for pool in self.pools:
            if pool is exclude or not pool.waiters or len(pool.servers) + pool.connecting >= pool.settings.size:
                continue
            queued = pool.waiting_since()
            if best is None or queued < since:
                best, since = pool, queued
        return best

    def slot_freed(self) -> None:
        """A member's connection closed (or failed to open): the pool waiting longest opens one."""
        while not self.full():
            pool = self.longest_waiting()
            if pool is None or pool.capped():
                return
            pool._start_connect(for_waiters=True)

    def reclaim_idle(self, for_pool: Pool) -> bool:
        """Close the longest-idle connection of another member pool, making room for
        ``for_pool``; False when there is none."""
        oldest: ServerConnection | None = None
        for pool in self.pools:
            if pool is not for_pool:
                for server in pool.idle:
                    if not server.closed and (oldest is None or server.idle_since < oldest.idle_since):
                        oldest = server
        if oldest is None:
            return False
        oldest.pool.discard_idle(oldest, f"{self.setting} reached: making room for pool {for_pool.name}")
        return True


class Pool:
    def __init__(
        self,
        key: PoolKey,
        password: str | None,
        settings: PoolSettings,
        validated_statements: set[bytes] | None = None,
    ) -> None:
        self.key = key
        # Shared with the router's StatementRegistry (router/prepared.py).
        self.validated_statements = validated_statements if validated_statements is not None else set()
        self.name = key.name
        self.password = password
        self.settings = settings
        self.idle: deque[ServerConnection] = deque()
        self.waiters: deque[tuple[Waiter, float]] = deque()  # (waiter, deadline)
        self._expiry: asyncio.TimerHandle | None = None
        self.servers: set[ServerConnection] = set()  # every open or opening connection
        self.connecting = 0
        # ParameterStatus values of a real server connection, sent to clients at login.
        self.server_params: dict[str, str] | None = None
        self._status_block: bytes | None = None  # server_params as ParameterStatus messages
        # The login ParameterStatus block for clients' startup settings, with what the server
        # reports of them, by the settings: learnt once per distinct set (``_startup_status``).
        self._startup_reports: OrderedDict[frozenset, bytes] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        # Called when a server of this pool answers 42883 (undefined_function), if set.
        self.on_undefined_function = None
        # auth_query pools log in with the SCRAM keys learnt from a client, not a password.
        self.scram_keys: tuple[bytes, bytes] | None = None
        # max_db_connections / max_user_connections this pool counts towards (PoolManager).
        self.caps: tuple[ConnectionCap, ...] = ()
        # The database entry (or tenant) the pool was made for: a reload recomputes from it.
        self.db: DatabaseConfig | None = None
        self._reserve_check: asyncio.TimerHandle | None = None
        self.reserve_opened = 0  # connections opened beyond pool_size, ever
        # On a node a reload took out of its cluster: no minimum kept, dropped when empty.
        self.retired = False

    # --- the data path ---------------------------------------------------------------

    def acquire_nowait(self) -> ServerConnection | None:
        idle = self.idle
        lifetime = self.settings.lifetime
        while idle:
            server = idle.pop()  # most recently used first: its caches are warm
            if server.closed:
                continue
            if lifetime and time.monotonic() - server.created_at > lifetime:
                server.close("server_lifetime reached")
                continue
            return server
        return None

    def wait_for_server(self, waiter: Waiter) -> None:
        """Queue ``waiter``; it gets ``server_assigned(server)`` or ``server_failed(error)``.

        Callbacks rather than a future and a task per wait: under load most transactions
        wait, and this is on the hot path.
        """
        deadline = time.monotonic() + self.settings.query_wait_timeout
        self.waiters.append((waiter, deadline))
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_at(
                self._loop_time_for(deadline), self._expire_waiters
            )
        s = self.settings
        if len(self.servers) + self.connecting < s.size:
            if not self.caps:
                self._start_connect(for_waiters=True)
            else:
                self._open_within_caps()
        elif s.reserve_size and s.reserve_timeout and self._reserve_check is None:
            self._reserve_check = asyncio.get_running_loop().call_at(
                self._loop_time_for(deadline - s.query_wait_timeout + s.reserve_timeout), self._reserve_due
            )

    def _reserve_due(self) -> None:
        self._reserve_check = None
        self.use_reserve(time.monotonic())

    def use_reserve(self, now: float) -> None:
        """reserve_pool_size: open a connection beyond pool_size for each client that has
        waited reserve_pool_timeout (and that no connection being opened will serve), up to
        the reserve; then look again when the next waiter's time comes. The janitor calls
        this too, for waiters that found the reserve in use."""
        s = self.settings
        waiters = self.waiters
        if not (s.reserve_size and s.reserve_timeout and waiters):
            return
        # Every waiter queued query_wait_timeout before its deadline: the queue is in order.
        since = now - s.reserve_timeout + s.query_wait_timeout
        overdue = 0
        for _, deadline in waiters:
            if deadline > since:
                break
            overdue += 1
        room = s.size + s.reserve_size - len(self.servers) - self.connecting
        for _ in range(min(overdue - self.connecting, room)):
            if self.capped():
                break
            self.reserve_opened += 1
            log.info(
                "pool %s: a client waited %.1fs for a server connection: opening one from the reserve (%d beyond pool_size %d)",
                self.name, s.reserve_timeout, len(self.servers) + self.connecting + 1 - s.size, s.size,
            )  # fmt: skip
            self._start_connect(for_waiters=True)
        if overdue < len(waiters) and self._reserve_check is None:
            self._reserve_check = asyncio.get_running_loop().call_at(
                self._loop_time_for(waiters[overdue][1] - s.query_wait_timeout + s.reserve_timeout), self._reserve_due
            )

    def _open_within_caps(self) -> None:
        """Open a connection for a waiter if every cap has room; else free a sibling's idle
        connection under each full cap (its slot_freed then opens one here, or for whoever
        waited longer)."""
        full = [cap for cap in self.caps if cap.full()]
        if not full:
            self._start_connect(for_waiters=True)
            return
        for cap in full:
            cap.reclaim_idle(self)

    def capped(self) -> bool:
        return any(cap.full() for cap in self.caps)

    def waiting_since(self) -> float:
        """When the oldest waiter queued (deadlines share the pool's query_wait_timeout)."""
        return self.waiters[0][1] - self.settings.query_wait_timeout

    def discard_idle(self, server: ServerConnection, reason: str) -> None:
        """Close an idle connection now and count it gone (its slot is free at once)."""
        server.close(reason)
        self.servers.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        for cap in self.caps:
            cap.slot_freed()

    def cancel_wait(self, waiter: Waiter) -> None:
        for i, (queued, _) in enumerate(self.waiters):
            if queued is waiter:
                del self.waiters[i]
                return

    async def acquire(self) -> ServerConnection:
        """Awaitable acquire, for the slow paths (login, resets)."""
        server = self.acquire_nowait()
        if server is not None:
            return server
        waiter = _FutureWaiter(asyncio.get_running_loop().create_future())
        self.wait_for_server(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self.cancel_wait(waiter)
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(waiter.future.result())
            raise

    def release(self, server: ServerConnection) -> None:
        """Take back a connection that is idle (ReadyForQuery 'I', nothing pending)."""
        if server.closed:
            return
        if server.cancels_in_flight:
            server.release_after_cancel = True  # Router._send_cancel releases it when done
            return
        now = time.monotonic()
        s = self.settings
        lifetime = s.lifetime
        if lifetime and now - server.created_at > lifetime:
            server.close("server_lifetime reached")
            return
        if server.close_needed:
            server.close("RECONNECT: closed once released")
            return
        if self.caps and self._hand_slot_on(server):
            return
        held = len(self.servers)
        if held > s.size:
            if not self.waiters:
                # A reserve connection that nobody waits for: the pool goes back to its size.
                self.discard_idle(server, "beyond pool_size with no client waiting")
                return
            if held > s.size + (s.reserve_size if s.reserve_timeout else 0):
                # A reload lowered pool_size (or the reserve) below what the pool holds: it
                # shrinks as connections come back, waiters or not, and serves them at size.
                self.discard_idle(server, f"pool_size lowered to {s.size}")
                return
        if self.waiters:
            waiter, deadline = self.waiters.popleft()
            waited = now - deadline + s.query_wait_timeout
            observe_pool_wait(waited)
            if not isinstance(waiter, _FutureWaiter):  # a client's transaction, not a login's look
                waiter.traffic.wait_time += waited
            waiter.server_assigned(server)
            return
        server.idle_since = now
        self.idle.append(server)

    def _hand_slot_on(self, server: ServerConnection) -> bool:
        """Under a full cap, a released connection whose slot a sibling pool's client has
        waited for longer than this pool's own is closed, and the sibling opens one; under a
        cap a reload lowered below what its pools hold, it is closed."""
        mine = self.waiting_since() if self.waiters else None
        for cap in self.caps:
            used = cap.used()
            if used < cap.limit:
                continue
            if used > cap.limit:
                self.discard_idle(server, f"{cap.setting} lowered to {cap.limit} for {cap.name}")
                return True
            sibling = cap.longest_waiting(exclude=self)
            if sibling is not None and (mine is None or sibling.waiting_since() < mine):
                self.discard_idle(server, f"{cap.setting} reached: making room for pool {sibling.name}")
                return True
        return False

    def open_for_waiters(self) -> None:
        """After a reload raised pool_size or a cap (or removed one): open a connection for
        each waiting client that none being opened will serve, as far as the size and caps
        now allow, rather than leaving them to wait for a release."""
        for _ in range(min(len(self.waiters) - self.connecting, self.settings.size - len(self.servers) - self.connecting)):
            if self.capped():
                break
            self._start_connect(for_waiters=True)

    def reconnect(self) -> int:
        """The console's RECONNECT: every open connection is closed, idle ones now and busy
        ones when released; new ones are opened as clients need them. Returns how many."""
        marked = 0
        for server in list(self.servers):
            if server.closed or server.close_needed:
                continue
            marked += 1
            if server.client is None and server in self.idle:
                self.discard_idle(server, "RECONNECT")
            else:
                server.close_needed = True
        return marked

    def retire(self) -> None:
        """No [databases] entry makes it any more (a reload moved its node, real database,
        server user or TLS): close its connections (busy ones when released) and keep none
        open; PoolManager drops it once it is empty and no client points at it."""
        self.retired = True
        self.settings = replace(self.settings, min_size=0)
        self.reconnect()
        log.info("pool %s retired: no database entry makes it since the reload", self.name)

    def closes_needed(self) -> int:
        """Connections RECONNECT marked that are still open (WAIT_CLOSE)."""
        return sum(1 for server in self.servers if server.close_needed and not server.closed)

    def forget(self, server: ServerConnection) -> None:
        """A connection closed: drop it and, if clients wait, open a replacement."""
        self.servers.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        if self.waiters and len(self.servers) + self.connecting < self.settings.size and not self.capped():
            self._start_connect(for_waiters=True)
        for cap in self.caps:
            cap.slot_freed()

    def _loop_time_for(self, deadline: float) -> float:
        # Deadlines are kept on time.monotonic(); the loop's clock may differ in origin.
        loop = asyncio.get_running_loop()
        return loop.time() + (deadline - time.monotonic())

    def _expire_waiters(self) -> None:
        self._expiry = None
        now = time.monotonic()
        waiters = self.waiters
        # Every waiter has the same timeout, so the queue is ordered by deadline.
        while waiters and waiters[0][1] <= now:
            waiter, _ = waiters.popleft()
            full = [cap for cap in self.caps if cap.full()]
            waiter.server_failed(
                RouterError(
                    SQLState.TOO_MANY_CONNECTIONS,
                    f"no server connection available in pool {self.name} within "
                    f"query_wait_timeout ({self.settings.query_wait_timeout:g}s)",
                    severity="ERROR",
                    detail=" ".join(f"{cap.setting} ({cap.limit}) reached for {cap.name}." for cap in full) or None,
                )
            )
        if waiters:
            self._expiry = asyncio.get_running_loop().call_at(
                self._loop_time_for(waiters[0][1]), self._expire_waiters
            )

    # --- opening connections -----------------------------------------------------------

    async def open_connection(self) -> ServerConnection:
        loop = asyncio.get_running_loop()
        key = self.key
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                try:
                    if is_unix_socket(key.host):
                        _, server = await loop.create_unix_connection(
                            lambda: ServerConnection(self), unix_socket_path(key.host, key.port)
                        )
                    else:
                        _, server = await loop.create_connection(
                            lambda: ServerConnection(self), key.host, key.port
                        )
                except OSError as exc:
                    raise RouterError(
                        SQLState.CONNECTION_FAILURE,
                        f"could not connect to server {key.host}:{key.port}: {exc.strerror or exc}",
                        severity="FATAL",
                    ) from exc
                try:
                    await server.login(
                        key.host,
                        key.dbname,
                        key.user,
                        self.password,
                        # As libpq's sslmode: no TLS over a Unix socket, whatever server_tls says.
                        None if is_unix_socket(key.host) else self.settings.tls,
                        self.settings.tls_required,
                        self.settings.channel_binding,
                        self._login_params(),
                        scram_keys=self.scram_keys,
                    )
                except OSError as exc:  # the connection broke while logging in
                    server.close()
                    raise RouterError(
                        SQLState.CONNECTION_FAILURE,
                        f"server {self.name} closed the connection during login: {exc.strerror or exc}",
                    ) from exc
                except BaseException:
                    server.close()
                    raise
        except TimeoutError as exc:
            raise RouterError(
                SQLState.CONNECTION_FAILURE,
                f"timeout connecting to server {self.name} (server_connect_timeout)",
            ) from exc
        if self.server_params is None:
            self.server_params = dict(server.params)
        self.servers.add(server)
        return server

    def _login_params(self) -> dict[str, str]:
        params = {"application_name": self.settings.application_name}
        if self.settings.mode is PoolMode.SESSION:
            # The router's own setting as the login value of a session's server connection:
            # SHOW pgrouter.target then answers `auto` until the session sets it (which the
            # server then holds, see router_targets_for_server), and RESET, RESET ALL,
            # DISCARD ALL and a rollback come back to it as to any login value.
            params[ROUTER_TARGET_GUC] = "auto"
        return params

    def _start_connect(self, for_waiters: bool) -> None:
        # Counted now, not when the task first runs: several clients queueing in the same
        # loop iteration must not each open a connection beyond pool_size.
        self.connecting += 1
        self._spawn(self._open_and_release(for_waiters))

    async def _open_and_release(self, for_waiters: bool) -> None:
        """Open one connection (for waiters, or to keep min_pool_size) and hand it over."""
        try:
            try:
                server = await self.open_connection()
            finally:
                self.connecting -= 1
        except RouterError as exc:
            log.warning("pool %s: cannot open a server connection: %s", self.name, exc.message)
            # Fail the oldest waiter with the reason rather than letting it time out blindly;
            # those behind it get an attempt of their own (one that got as far as a socket
            # starts it from connection_lost: forget).
            if for_waiters and self.waiters:
                waiter, _ = self.waiters.popleft()
                waiter.server_failed(exc)
            if self.waiters and len(self.servers) + self.connecting < self.settings.size and not self.capped():
                self._start_connect(for_waiters=True)
            for cap in self.caps:
                cap.slot_freed()
            return
        self.release(server)

    async def learn_server_params(self) -> dict[str, str]:
        """The server's ParameterStatus set; opens a connection if none has been seen yet."""
        if self.server_params is None:
            server = self.acquire_nowait()
            if server is None:
                server = await self.acquire()
            self.release(server)
        assert self.server_params is not None
        return self.server_params

    async def login_parameter_status(self, application_name: str | None, settings: dict[str, str]) -> bytes:
        """The ParameterStatus messages a client gets at login: the server's set (built once
        per pool), with what the server reports of the client's startup ``settings`` (a
        dedicated server would have applied them: TimeZone, DateStyle, client_encoding, ...)
        and the client's own application_name when it sent one (a dedicated server would echo
        it)."""
        params = await self.learn_server_params()
        if self._status_block is None:
            self._status_block = self._parameter_status_block(params, {})
        block = await self._startup_status(settings) if settings else self._status_block
        if application_name is None:
            application_name = params.get("application_name")
        if application_name is None:
            return block
        return block + m.parameter_status("application_name", application_name)

    @staticmethod
    def _parameter_status_block(params: dict[str, str], reported: dict[str, str]) -> bytes:
        return b"".join(
            m.parameter_status(name, reported.get(name, value))
            for name, value in params.items()
            if name != "application_name"
        )

    async def _startup_status(self, settings: dict[str, str]) -> bytes:
        """The login ParameterStatus block (without application_name) with what a server
        reports when ``settings`` are applied to it: run them once on a server connection
        (then RESET ALL), remembered per distinct set. A value the server
        refuses as PostgreSQL would refuse it in a startup packet (an unknown name, an invalid
        value) raises, so the client's login fails as it would on the server; a setting that
        merely cannot be changed after connection start is left out, as the settings prelude
        leaves it."""
        key = frozenset(settings.items())
        reports = self._startup_reports
        block = reports.get(key)
        if block is not None:
            reports.move_to_end(key)
            return block
        server = await self.acquire()
        reported = {}
        refused: RouterError | None = None
        try:
            await server.run_until_ready("RESET ALL")
            for name, value in settings.items():
                try:
                    reported.update(await server.run_until_ready(set_config_sql(name, value)))
                except RouterError as exc:
                    if server.closed:
                        raise
                    if refused is None and exc.sqlstate in _REFUSED_AT_STARTUP:
                        refused = exc
            await server.run_until_ready("RESET ALL")
            # Which RESET ALL leaves alone (a role, a session user in the settings).
            await server.run_until_ready("RESET SESSION AUTHORIZATION")
            await server.run_until_ready("RESET ROLE")
            server.session_key = None
        finally:
            self.release(server)  # a connection that broke meanwhile is closed, not kept
        if refused is not None:
            raise RouterError(refused.sqlstate, refused.message, severity="FATAL")
        block = reports[key] = self._parameter_status_block(self.server_params or {}, reported)
        if len(reports) > _STARTUP_REPORTS_KEPT:
            reports.popitem(last=False)
        return block

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pool %s: background task failed", self.name, exc_info=task.exception())

    # --- upkeep (called by the janitor) -------------------------------------------------

    def maintain(self, now: float) -> None:
        """Close idle connections past idle timeout or lifetime; top up to min_size; open
        reserve connections for clients that have waited long enough."""
        s = self.settings
        keep = []
        for server in self.idle:
            too_old = s.lifetime and now - server.created_at > s.lifetime
            too_idle = s.idle_timeout and now - server.idle_since > s.idle_timeout
            if server.closed:
                continue
            if too_old or (too_idle and len(self.servers) > s.min_size):
                server.close("server_lifetime reached" if too_old else "server_idle_timeout reached")
                self.servers.discard(server)
            else:
                keep.append(server)
        # Above a pool_size a reload lowered: idle connections beyond it close, oldest first.
        over = len(self.servers) - s.size - (s.reserve_size if s.reserve_timeout else 0)
        while over > 0 and keep:
            server = keep.pop(0)
            server.close(f"pool_size lowered to {s.size}")
            self.servers.discard(server)
            over -= 1
        closed = len(self.idle) - len(keep)
        self.idle = deque(keep)
        if closed:
            for cap in self.caps:
                cap.slot_freed()
        missing = s.min_size - len(self.servers) - self.connecting
        for _ in range(max(0, missing)):
            if self.capped():
                break
            self._start_connect(for_waiters=False)
        if self.waiters:
            self.use_reserve(now)

    def end_idle_transactions(self, now: float, timeout: float) -> None:
        """idle_transaction_timeout: disconnect each client that has held its server connection
        inside a transaction (ReadyForQuery 'T' or 'E', every reply in) without sending anything
        for ``timeout`` seconds. Seen by the janitor: a server connection is marked with the
        Sync/Query count its client had sent when it was first seen idle so, and a later Sync
        or Query starts the clock again. A client in the middle of an extended-protocol
        exchange (messages sent without their Sync yet, such as Execute and Flush fetching a
        portal a part at a time) does not count as idle. Nothing on the data path."""
        for server in list(self.servers):
            client = server.client
            if client is None or server.tx_status == m.IDLE or server.pending or client.unsynced:
                server.idle_in_transaction = None
                continue
            server.idle_in_transaction, expired = _unchanged_for(server.idle_in_transaction, server.stmts.sent_z, now, timeout)
            if expired:
                client.idle_transaction_timed_out(timeout)

    def end_long_queries(self, now: float, timeout: float) -> None:
        """query_timeout: a server connection that has owed a ReadyForQuery (for a Query,
        Sync or FunctionCall sent) for ``timeout`` seconds without any coming back runs a query
        that long: its client is told (and disconnected) and the query cancelled. Seen by the
        janitor, like end_idle_transactions: a server connection is marked with its
        ReadyForQuery count when first seen owing one, and each one that arrives starts the
        clock again, so in a pipeline each query has the whole timeout. Messages sent without
        a Sync (Execute and Flush fetching a portal) owe nothing and are not timed."""
        for server in list(self.servers):
            client = server.client
            if client is None or not server.pending:
                server.query_started = None
                continue
            server.query_started, expired = _unchanged_for(server.query_started, server.stmts.recv_z, now, timeout)
            if expired:
                client.query_timed_out(server, timeout)

    def stats(self) -> dict[str, int]:
        return {
            "servers": len(self.servers),
            "idle": len(self.idle),
            "active": len(self.servers) - len(self.idle),
            "connecting": self.connecting,
            "waiting": len(self.waiters),
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for server in list(self.servers):
            server.close("router shutting down")
        if self._expiry is not None:
            self._expiry.cancel()
        if self._reserve_check is not None:
            self._reserve_check.cancel()
        waiters, self.waiters = self.waiters, deque()
        for waiter, _ in waiters:
            waiter.server_failed(RouterError(SQLState.ADMIN_SHUTDOWN, "router is shutting down"))
