"""The application object: builds every part from the settings, owns them, and starts and
stops them in one place. It is also the seam later layers plug into: ``resolve_database``
(which tenant/database a client logs into) and ``pool_for_transaction`` (which pool serves a
client's next transaction).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from router.backend.server import ServerConnection
from router.config import DatabaseConfig, PoolMode, Settings
from router.frontend.client import ClientConnection, new_cancel_key
from router.pools.manager import PoolManager
from router.pools.pool import Pool
from router.protocol.errors import RouterError, SQLState
from router.protocol.startup import build_cancel_request
from router.routing.classify import ClassifierCache
from router.routing.functions import FunctionCatalog
from router.session import StatementRegistry

log = logging.getLogger("pgrouter")

LISTEN_BACKLOG = 1024


@dataclass(slots=True)
class Target:
    """Where a logged-in client's transactions go."""

    database: DatabaseConfig
    pool: Pool
    pool_mode: PoolMode


class Router:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.statements = StatementRegistry()
        # Statement classification (pglast), cached by text; session statements use it today,
        # read/write routing will.
        self.classifier = ClassifierCache()
        self.functions = FunctionCatalog.builtin()
        self.client_text_encoding = "utf-8"
        self.pools = PoolManager(settings, self.statements.validated)
        self.clients: dict[int, ClientConnection] = {}  # by router-issued cancel pid
        self.client_count = 0
        self.pinned_clients: set[ClientConnection] = set()  # counted for metrics
        self.client_tls_context = self._client_tls_context()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port: int | None = None

    def _client_tls_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not (s.client_tls_cert and s.client_tls_key):
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(s.client_tls_cert), str(s.client_tls_key))
        return ctx

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.pools.start()
        self._server = await loop.create_server(
            lambda: ClientConnection(self),
            self.settings.listen_host,
            self.settings.listen_port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s:%d", self.settings.listen_host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self.clients.values()):
            client.fail(RouterError(SQLState.ADMIN_SHUTDOWN, "terminating connection: router is shutting down"))
        await self.pools.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def spawn(self, coro) -> asyncio.Task:
        """Run a background coroutine owned by the router (cancelled at stop, errors logged)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # --- clients ---------------------------------------------------------------------

    def admit_client(self, client: ClientConnection) -> bool:
        if self.client_count >= self.settings.max_client_conn:
            return False
        self.client_count += 1
        client.admitted = True
        return True

    def register_client(self, client: ClientConnection) -> tuple[int, int]:
        while True:
            pid = new_cancel_key() & 0x7FFFFFFF
            if pid and pid not in self.clients:
                break
        self.clients[pid] = client
        return pid, new_cancel_key()

    def note_pinned(self, client: ClientConnection) -> None:
        if client.pins:
            self.pinned_clients.add(client)
        else:
            self.pinned_clients.discard(client)

    def forget_client(self, client: ClientConnection) -> None:
        self.pinned_clients.discard(client)
        if getattr(client, "admitted", False):
            client.admitted = False
            self.client_count -= 1
        if self.clients.get(client.cancel_pid) is client:
            del self.clients[client.cancel_pid]

    def cancel(self, pid: int, key: int) -> None:
        """A CancelRequest: cancel what that client runs now, if anything; else ignore it,
        as PostgreSQL does for a key it does not know."""
        client = self.clients.get(pid)
        if client is None or not client.matches_cancel_key(key):
            log.info("ignoring CancelRequest with unknown key")
            return
        server = client.server
        if server is None or server.pending == 0:
            return
        server.cancels_in_flight += 1
        self.spawn(self._send_cancel(server))

    async def _send_cancel(self, server: ServerConnection) -> None:
        host, port = server.pool.key.host, server.pool.key.port
        try:
            async with asyncio.timeout(self.settings.server_connect_timeout):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(build_cancel_request(server.backend_pid, server.backend_key))
                await writer.drain()
                # The postmaster closes the connection once it has signalled the backend.
                await reader.read()
                writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("could not forward cancel to %s:%d: %s", host, port, exc)
        finally:
            server.cancels_in_flight -= 1
            if not server.cancels_in_flight and server.release_after_cancel:
                server.release_after_cancel = False
                server.pool.release(server)

    # --- the routing seam ------------------------------------------------------------

    def resolve_database(self, client: ClientConnection) -> Target:
        databases = self.settings.databases
        db = databases.get(client.database) or databases.get("*")
        if db is None:
            raise RouterError(SQLState.INVALID_CATALOG_NAME, f'database "{client.database}" does not exist')
        cluster = self.settings.clusters[db.cluster]
        pool = self.pools.pool_for(db, client.database, client.user, cluster.primary)
        return Target(db, pool, pool.settings.mode)

    def pool_for_transaction(self, client: ClientConnection) -> Pool:
        """The pool that serves ``client``'s next transaction. Today: its primary pool."""
        return client.pool
