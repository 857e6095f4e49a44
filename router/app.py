"""The application object: builds every part from the settings, owns them, and starts and
stops them in one place. It is also the seam later layers plug into: ``resolve_database``
(which tenant/database a client logs into) and ``pool_for_transaction`` (which pool serves a
client's next transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import time
import weakref
from dataclasses import dataclass, replace

from router.backend.server import ServerConnection
from router.causal import WriteTimes
from router.config import DatabaseConfig, PoolMode, Settings, TransactionRouting
from router.frontend.cancel import CancelOutcome, CancelRelay, issue_pid
from router.frontend.client import ClientConnection, new_cancel_key
from router.pools.manager import PoolManager, asyncpg_tls
from router.pools.pool import Pool, PoolKey, is_unix_socket, unix_socket_path
from router.prepared import StatementRegistry
from router.protocol.errors import RouterError, SQLState
from router.protocol.startup import build_cancel_request
from router.routing.classify import ClassifierCache
from router.routing.functions import FunctionCatalog
from router.routing.route import (
    FLUSHES,
    PLAIN_READ,
    RouteReason,
    VerdictCache,
    decide,
    held_verdict,
    lone_statement_sql,
    open_segment,
)
from router.routing.verdict import StatementKind
from router.routing.verdict import Target as NodeKind
from router.sockopts import keepalive_options
from router.splitting import SplitCluster
from router.stats.histogram import FastHistogram
from router.stats.queries import QueryStats
from router.tasks import cancel_and_wait
from router.tenants import Gate, TenantManager, TenantPaused, asyncpg_ssl
from router.topology.catalog import CatalogWatch, ConnectParams, FunctionCatalogs
from router.topology.cluster import NodeState
from router.workers.shares import WorkerSlot

log = logging.getLogger("pgrouter")

LISTEN_BACKLOG = 1024
# Settings that SIGHUP (or POST /reload) applies while running; any other needs a restart.
LIVE_SETTINGS = frozenset({
    "pool_size", "min_pool_size", "max_client_conn", "query_wait_timeout",
    "server_idle_timeout", "server_lifetime", "server_connect_timeout", "log_level",
    "client_tls_cert", "client_tls_key", "lag_check_interval", "tenant_drop_timeout",
    "shutdown_timeout", "function_catalog_refresh", "log_format", "query_stats_max",
    "slow_query_ms", "idle_transaction_timeout", "log_connections", "log_disconnections",
    "client_idle_timeout", "query_timeout", "reserve_pool_size", "reserve_pool_timeout",
    "users", "admin_console_users", "stats_period", "max_db_connections", "max_user_connections",
})  # fmt: skip
# What a reload changes in an existing [databases] entry, its pools following; with
# MOVING_DATABASE_FIELDS below its clients move to new pools; NEW_LOGIN_DATABASE_FIELDS apply
# to new logins. Every field of an entry is in one of the three (an entry added or removed is
# applied too).
LIVE_DATABASE_FIELDS = (
    "pool_size", "min_pool_size", "query_wait_timeout", "reserve_pool_size", "server_password", "max_db_connections",
)  # fmt: skip
# What a reload may change in an entry by moving its clients to new pools (_follow_moves).
MOVING_DATABASE_FIELDS = ("cluster", "dbname", "server_user", "server_tls", "server_tls_ca")
# What a reload changes for the logins after it (new pools); clients already in keep theirs.
NEW_LOGIN_DATABASE_FIELDS = ("pool_mode",)
# What of a cluster changes in place with a reload; any other change makes a new monitor.
_LIVE_LAG = ("max_replica_lag", "max_replica_lag_bytes", "replica_fallback", "replica_affinity")
_REPLICA_READ = ("replica", RouteReason.READ)
_Q = ord("Q")
# Transaction durations (pgrouter_transaction_duration_seconds), from 100 µs to a minute.
TRANSACTION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass(slots=True)
class Target:
    """Where a logged-in client's transactions go."""

    database: DatabaseConfig
    pool: Pool
    pool_mode: PoolMode
    route: DatabaseRoute | None = None  # None: one node, no read/write splitting


class DatabaseRoute:
    """One database (as its server connections log in) of a cluster with replicas: the pools
    on each node and the verdict cache for its function catalog."""

    def __init__(
        self, router: Router, db: DatabaseConfig, dbname: str, user: str, primary_pool: Pool, split: SplitCluster
    ) -> None:
        self.router = router
        self.db = db
        self.dbname = dbname
        self.user = user
        self.split = split
        # Function volatilities of this database, read from the cluster's current primary
        # (catalog.py; the configured one only until the topology knows better).
        self.catalog_key = (split.name, primary_pool.key.dbname)
        router.catalogs.register(
            self.catalog_key,
            ConnectParams(
                host=split.configured_primary.host,
                port=split.configured_primary.port,
                database=primary_pool.key.dbname,
                user=primary_pool.key.user,
                password=db.server_password,
                ssl=split.ssl,
            ),
            locate=split.catalog_node,
        )
        self.catalog = router.catalogs.get(self.catalog_key)
        self.primary_pool = primary_pool
        classifier = router.classifier
        self.verdicts = VerdictCache(lambda sql: classifier.classify(sql, self.catalog))
        self._pools: dict[NodeState, Pool] = {}
        # In a pool mode its entry no longer has (clients in from before a reload changed
        # it): the pools it opens from now on are leftovers too (Router._sweep_leftovers).
        self.leftover = False

    def current_catalog(self) -> None:
        """Follow the catalog of this database (a reload is a new object)."""
        catalog = self.router.catalogs.get(self.catalog_key)
        if catalog is not self.catalog:
            self.catalog = catalog
            self.verdicts.reset()

    def undefined_function(self) -> None:
        """A server answered 42883: the function may be new; read the catalog again."""
        self.router.catalogs.invalidate(self.catalog_key)

    def uses(self, pool: Pool) -> bool:
        return pool is self.primary_pool or pool in self._pools.values()

    def pools(self) -> list[Pool]:
        return [self.primary_pool, *self._pools.values()]

    def pool(self, node: NodeState) -> Pool:
        pool = self._pools.get(node)
        if pool is None:
            pool = self.router.pools.pool_for(self.db, self.dbname, self.user, node)
            pool.on_undefined_function = self.undefined_function
            pool.scram_keys = self.primary_pool.scram_keys  # auth_query: the same login
            self._pools[node] = pool
            if self.leftover:
                self.router.leftover_pools.add(pool)
        return pool


class Router:
    def __init__(self, settings: Settings, worker: WorkerSlot | None = None) -> None:
        # One of several worker processes (router/workers/): ``settings`` are its share already.
        self.worker = worker
        self.settings = settings
        self.statements = StatementRegistry()
        # Statement classification (pglast), cached by text; session statements use it today,
        # read/write routing will.
        self.classifier = ClassifierCache()
        self.functions = FunctionCatalog.builtin()
        self.client_text_encoding = "utf-8"
        self.pools = PoolManager(settings, self.statements.validated)
        self.pools.on_tick = self._tick
        self.pools.pool_in_use = self._pool_in_use
        self.clients: dict[int, ClientConnection] = {}  # by router-issued cancel pid
        self.client_count = 0  # admitted: logging in, logged in, or in the admin console
        self.console_sessions = 0
        self.pinned_clients: set[ClientConnection] = set()  # counted for metrics
        # TLS SNI host names by handshake, until login reads them (_note_server_name).
        self.sni_names: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()
        self.client_tls_context = self._client_tls_context()
        self.socket_options = keepalive_options(settings)
        self._server: asyncio.Server | None = None
        self._unix_server: asyncio.Server | None = None  # unix_socket_dir
        self.db_gates: dict[str, Gate] = {}  # the console's PAUSE, by database ("": every client)
        self.disabled_databases: set[str] = set()  # the console's DISABLE: no new logins
        self._unix_path: tuple[str, int] = ("", 0)  # its socket file and inode
        self._tasks: set[asyncio.Task] = set()
        self.port: int | None = None
        # read_your_writes = tenant: when each tenant last wrote, shared with sibling workers.
        self.write_times = WriteTimes(worker)
        # Read/write splitting for every cluster that has replicas.
        self.splits: dict[str, SplitCluster] = {
            name: SplitCluster(name, cluster, settings, write_times=self.write_times)
            for name, cluster in settings.clusters.items()
            if cluster.replicas
        }
        self.db_routes: dict[tuple[str, PoolKey], DatabaseRoute] = {}  # by cluster, primary pool
        self.catalogs = FunctionCatalogs(
            refresh_interval=settings.function_catalog_refresh, builtin=self.functions
        )
        self.first_statement = settings.transaction_routing is TransactionRouting.FIRST_STATEMENT
        self.tenants = TenantManager(self)
        self.admin = None  # the admin HTTP API server, when admin_port >= 0
        self.draining = False  # shutting down: /readyz answers 503
        self.config_path = None  # the file the settings came from (reload re-reads it)
        # The whole router's settings, as SHOW CONFIG tells them: with workers, ``settings``
        # holds this worker's part of each limit (WorkerSlot.settings_for); cli.py sets these.
        self.configured_settings = settings
        self._split_starts: dict[str, asyncio.Task] = {}  # tenant clusters' monitors starting
        # What a reload left without a [databases] entry or cluster, kept while clients of
        # before the reload use it (_sweep_leftovers): pools no entry makes (min_pool_size
        # dropped), and removed clusters by name with their lag monitors (None: no replicas).
        self.leftover_pools: set[Pool] = set()
        self.leftover_clusters: list[tuple[str, SplitCluster | None]] = []
        # Measured on the hot path (router/stats/): query statistics and the slow-query log,
        # transaction durations, errors sent to clients by SQLSTATE class.
        self.query_stats: QueryStats | None = None
        self._configure_query_stats(settings)
        self.transaction_durations = FastHistogram(TRANSACTION_BUCKETS)
        self.error_classes: dict[str, int] = {}
        # Exchanges run again after "cached plan must not change result type" (reprepare).
        self.reprepared = 0
        self.cancel_outcomes: dict[CancelOutcome, int] = dict.fromkeys(CancelOutcome, 0)
        self.cancel_relay: CancelRelay | None = None  # with a tenant registry (Redis)
        self.control = None  # a worker's control socket (router/workers/control.py)

    def _configure_query_stats(self, settings: Settings) -> None:
        if settings.query_stats_max == 0:
            self.query_stats = None
            return
        slow = settings.slow_query_ms / 1000 if settings.slow_query_ms > 0 else None
        stats = self.query_stats
        if stats is None:
            self.query_stats = QueryStats(settings.query_stats_max, slow, self.client_text_encoding)
        else:
            stats.max_entries = settings.query_stats_max
            stats.slow_query_seconds = slow

    def count_error(self, sqlstate: bytes | str) -> None:
        """An ErrorResponse went to a client (the server's or the router's own)."""
        cls = sqlstate[:2] if isinstance(sqlstate, str) else sqlstate[:2].decode("ascii", "replace")
        self.error_classes[cls] = self.error_classes.get(cls, 0) + 1

    def count_reprepare(self) -> None:
        self.reprepared += 1

    def _client_tls_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not (s.client_tls_cert and s.client_tls_key):
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(s.client_tls_cert), str(s.client_tls_key))
        if s.tenant_sni_suffix:
            ctx.sni_callback = self._note_server_name
        return ctx

    def _note_server_name(self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        """TLS SNI: the host name a client connects to, for login.py to read after the
        handshake (tenant_sni_suffix)."""
        if server_name:
            self.sni_names[ssl_object] = server_name

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.pools.start()
        self.catalogs.start()
        if self.splits:
            await asyncio.gather(*(split.start() for split in self.splits.values()))
        await self.tenants.start()
        if self.tenants.store is not None:
            self.cancel_relay = CancelRelay(self.tenants.store, self.cancel_relayed)
            self.cancel_relay.start()
        if self.worker is not None:
            from router.workers.control import ControlServer

            self.control = ControlServer(self, self.worker)
            await self.control.start()
        self._server = await loop.create_server(
            lambda: ClientConnection(self),
            self.settings.listen_host,
            self.settings.listen_port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
            # Workers share the port: the kernel spreads new connections between them.
            reuse_port=True if self.worker is not None else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s:%d", self.settings.listen_host, self.port)
        if self.settings.unix_socket_dir and (self.worker is None or self.worker.index == 0):
            await self._listen_unix(self.settings.unix_socket_dir, self.port)
        if self.settings.admin_port >= 0:
            from router.admin.server import serve

            s = self.settings
            self.admin = await serve(
                self,
                provision_dsn=s.admin_provision_dsn.get_secret_value() if s.admin_provision_dsn else None,
                max_tenant_labels=s.metrics_max_tenant_labels,
            )

    async def _listen_unix(self, directory: str, port: int) -> None:
        """unix_socket_dir: also listen on ``<directory>/.s.PGSQL.<port>``, where libpq looks
        for ``host=<directory> port=<port>``. A socket file nobody answers on (left by a
        router that was killed) is replaced; one that answers is another server's: refused."""
        path = unix_socket_path(directory, port)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # stale
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from exc
            else:
                raise OSError(errno.EADDRINUSE, f"cannot listen on {path}: another server is listening there")
            finally:
                probe.close()
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: ClientConnection(self), path, backlog=LISTEN_BACKLOG
        )
        os.chmod(path, self.settings.unix_socket_mode)
        self._unix_server, self._unix_path = server, (path, os.stat(path).st_ino)
        log.info("listening on %s", path)

    def _close_listeners(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._unix_server is not None:
            self._unix_server.close()
            path, inode = self._unix_path
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:  # still ours, not a successor's
                    os.unlink(path)

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        self._close_listeners()
        for client in list(self.clients.values()):
            client.fail(RouterError(SQLState.ADMIN_SHUTDOWN, "terminating connection: router is shutting down"))
        await self.pools.stop()
        for split in [*self.splits.values(), *(split for _, split in self.leftover_clusters if split is not None)]:
            await split.stop()
        await self.catalogs.stop()
        if self.control is not None:
            await self.control.stop()
        if self.cancel_relay is not None:
            await self.cancel_relay.stop()
        await self.tenants.stop()
        # What killed a task was logged by _task_done; here only its end matters.
        await asyncio.gather(*(cancel_and_wait(task) for task in list(self._tasks)), return_exceptions=True)
        for server in (self._server, self._unix_server):
            if server is not None:
                await server.wait_closed()

    async def drain(self, timeout: float) -> bool:
        """Graceful shutdown, first half: readiness turns false, the listener closes, and
        transactions in flight get up to ``timeout`` seconds to finish. Returns whether they
        all did; ``stop()`` then closes everything."""
        self.draining = True
        self._close_listeners()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(client.server is not None for client in self.clients.values()):
            if asyncio.get_running_loop().time() >= deadline:
                busy = sum(client.server is not None for client in self.clients.values())
                log.warning("shutdown_timeout reached with %d transactions still running", busy)
                return False
            await asyncio.sleep(0.02)
        return True

    def status(self) -> dict:
        """This process's clients, pools and monitored nodes (GET /pools, GET /topology):
        counts as PgBouncer's SHOW POOLS gives them, nodes as the lag monitor last saw them."""
        clients = list(self.clients.values())
        return {
            "clients": {
                "total": len(clients),
                "active": sum(1 for c in clients if c.server is not None),
                "waiting": sum(1 for c in clients if c._waiting_on is not None),
                "pinned": len(self.pinned_clients),
            },
            "pools": {
                pool.name: {
                    "size": pool.settings.size, **pool.stats(), "reserve_size": pool.settings.reserve_size,
                    "reserve_opened": pool.reserve_opened,
                    # Each cap the pool counts towards (SHOW POOLS' caps): its limit, and the
                    # connections all its pools hold now.
                    **{cap.setting: cap.limit for cap in pool.caps},
                    **{f"{cap.setting}_used": cap.used() for cap in pool.caps},
                }
                for pool in self.pools.pools.values()
            },
            "nodes": [{"cluster": name, **n.status()} for name, split in self.splits.items() for n in split.topology.nodes],
        }

    def reload(self, settings: Settings) -> dict[str, list[str]]:
        """Apply what can change while running (SIGHUP, POST /reload); report the rest.

        Applied at once, without dropping a connection: pool sizes and timeouts (existing pools
        included), limits and connection caps (``PoolManager.recap``), lag thresholds, the log
        level, the client TLS certificate and the logins (``users``, read at each login),
        [databases] entries added, removed, moved
        (MOVING_DATABASE_FIELDS), in a new pool mode for new logins, or changed in
        LIVE_DATABASE_FIELDS (``_reload_databases``), clusters added or with new nodes
        (``_follow_moves``), and clusters removed. What a removed entry or cluster leaves
        (pools, lag monitors, function catalogs) serves its clients until they leave, then
        goes (``_sweep_leftovers``). Anything else (listen address, registry...) needs a
        restart and is not applied at all."""
        configured = settings
        if self.worker is not None:
            settings = self.worker.settings_for(settings)
        old = self.settings
        applied: list[str] = []
        live = LIVE_SETTINGS
        restart = [
            name for name in type(settings).model_fields
            if name not in live and name != "clusters" and getattr(settings, name) != getattr(old, name)
        ]
        for name in sorted(live):
            if getattr(settings, name) != getattr(old, name):
                applied.append(name)
        # Clusters change live: lag thresholds in place; a new cluster, or new nodes (or
        # monitor login) for one, through _follow_moves once the new settings are in. A cluster
        # removed (its entries are gone or moved too) serves new logins no more; its clients
        # keep its pools and monitor until they leave (_sweep_leftovers).
        moved_clusters: set[str] = set()
        for name, cluster in settings.clusters.items():
            before = old.clusters.get(name)
            if before is None or before.model_copy(update={field: getattr(cluster, field) for field in _LIVE_LAG}) != cluster:
                moved_clusters.add(name)
                applied.append(f"clusters.{name}")
                continue
            split = self.splits.get(name)
            if split is not None and (
                before.max_replica_lag != cluster.max_replica_lag
                or before.max_replica_lag_bytes != cluster.max_replica_lag_bytes
                or before.replica_fallback != cluster.replica_fallback
                or before.replica_affinity != cluster.replica_affinity
            ):
                split.topology.max_lag_seconds = cluster.max_replica_lag
                split.topology.max_lag_bytes = cluster.max_replica_lag_bytes
                split.config = cluster
                applied.append(f"clusters.{name}")
        removed_clusters = sorted(set(old.clusters) - set(settings.clusters))
        applied += [f"clusters.{name}" for name in removed_clusters]
        # What needs a restart is not applied at all: logins read the databases, clusters and
        # the rest from self.settings, and must not meet half of a new configuration.
        clusters = dict(settings.clusters)
        databases, changed, moved_databases = self._reload_databases(old, settings)
        if "databases" in restart:
            restart.remove("databases")
            applied += changed
        settings = settings.model_copy(
            update={
                **{name: getattr(old, name) for name in type(settings).model_fields if name not in live},
                "clusters": clusters,
                "databases": databases,
            }
        )
        self.settings = settings
        self.configured_settings = configured.model_copy(
            update={name: getattr(self.configured_settings, name) for name in type(settings).model_fields if name not in live}
        )
        self.pools.settings = settings
        for pool in self.pools.pools.values():
            # From the pool's own database entry (or tenant): its own values, else the global.
            if not pool.retired:
                pool.settings = replace(pool.settings, **self.pools.live_settings(pool.db))
        self.pools.recap()
        if moved_clusters or moved_databases:
            self._follow_moves(old, moved_clusters, moved_databases)
        for name in removed_clusters:
            self.leftover_clusters.append((name, self.splits.pop(name, None)))
            for key in [key for key in self.db_routes if key[0] == name]:
                del self.db_routes[key]  # its clients keep theirs
        self._note_leftover_pools(old)
        for name, db in databases.items():
            if (
                name not in old.databases
                or name in moved_databases
                or db.cluster in moved_clusters
                or db.pool_mode != old.databases[name].pool_mode
            ):
                self._open_min_pool(db, name)
        self._configure_query_stats(settings)
        if "client_tls_cert" in applied or "client_tls_key" in applied:
            self.client_tls_context = self._client_tls_context()
        logging.getLogger().setLevel(settings.log_level)
        log.info("reloaded: applied %s; needs a restart: %s", applied or "nothing", restart or "nothing")
        return {"applied": applied, "restart_required": restart}

    def _reload_databases(
        self, old: Settings, new: Settings
    ) -> tuple[dict[str, DatabaseConfig], list[str], set[str]]:
        """[databases] after a reload, the entries it changed, and those moved to
        another cluster, real database, server user or server TLS. An entry added or removed
        applies to new logins; clients already in keep their pools. An entry whose changes are
        all LIVE_DATABASE_FIELDS is applied and its pools follow it (a new server password for
        the connections opened from now on, the function catalog's next read included). One whose
        MOVING_DATABASE_FIELDS changed too is applied as well: its clients move to new pools
        (_follow_moves). One whose pool_mode changed is applied for new logins: they get
        pools in the new mode, while the clients already in keep theirs, whose mode they
        logged in with (_keep_old_mode_pools). Every field of an entry is of one of these
        kinds (tests/unit/test_reload_fields.py), so no change to an entry waits for a restart."""
        merged: dict[str, DatabaseConfig] = {}
        changed: list[str] = []
        moved: set[str] = set()
        for name, db in new.databases.items():
            before = old.databases.get(name)
            if before == db:
                merged[name] = before  # the same object: pools know their entry by identity
            elif before is None:
                merged[name] = db
                changed.append(f"databases.{name}")
            elif before.model_copy(update={field: getattr(db, field) for field in LIVE_DATABASE_FIELDS}) == db:
                merged[name] = db
                changed.append(f"databases.{name}")
                self._repoint_pools(before, db)
            elif before.model_copy(update={f: getattr(db, f) for f in (*LIVE_DATABASE_FIELDS, *MOVING_DATABASE_FIELDS)}) == db:
                merged[name] = db
                changed.append(f"databases.{name}")
                moved.add(name)
            else:  # the pool mode changed (every field of an entry is one of the three kinds)
                merged[name] = db
                changed.append(f"databases.{name}")
                if before.model_copy(update={f: getattr(db, f) for f in MOVING_DATABASE_FIELDS}) != before:
                    moved.add(name)
                self._keep_old_mode_pools(before, db)
        for name in old.databases.keys() - new.databases.keys():
            changed.append(f"databases.{name}")  # removed: no new logins
        return merged, sorted(changed), moved

    def _follow_moves(self, old: Settings, clusters: set[str], databases: set[str]) -> None:
        """A reload changed the nodes of ``clusters`` (or added them) and moved ``databases``
        to another cluster, real database, server user or server TLS, as PgBouncer follows
        a connect string changed in its file. Each such cluster gets a new lag monitor; the
        clients of its entries (and of the moved ones) send their next transactions to the new
        pools (a transaction running now finishes where it is, and a session-mode client keeps
        its server connection until it leaves). Pools that no entry makes any more (of an
        entry still there, or of a moved one as it was) are retired: idle connections close
        now, busy ones once released, and the pool goes when empty and unused."""
        settings = self.settings
        for name in clusters:
            split = self.splits.pop(name, None)
            if split is not None:
                self.spawn(split.stop())
            cluster = settings.clusters[name]
            if cluster.replicas:
                split = self.splits[name] = SplitCluster(name, cluster, settings, write_times=self.write_times)
                self.spawn(split.start())
        for key in [key for key in self.db_routes if key[0] in clusters]:
            del self.db_routes[key]  # made again at the next login or retarget
        # (A removed entry's pools stay as they are: its clients go on.)
        entries = {id(db) for db in settings.databases.values()} | {id(old.databases[name]) for name in databases}
        for pool in list(self.pools.pools.values()):
            if id(pool.db) in entries and not pool.retired and not self._made_by_an_entry(pool):
                pool.retire()
        for client in list(self.clients.values()):
            if client.tenant is not None:
                continue
            db = settings.databases.get(client.database) or settings.databases.get("*")
            if db is not None and (db.cluster in clusters or client.database in databases):
                try:
                    # If the reload changed the entry's mode too, the client keeps the one it
                    # logged in with, in pools of that mode where the entry now points; they
                    # are leftovers (_note_leftover_pools), retired once no client uses them.
                    target = self.resolve_database(client, attach=False, pool_mode=client.pool_mode)
                except RouterError as exc:  # DISABLEd: the client stays where it is
                    log.warning("client %s@%s not moved: %s", client.user, client.peer, exc.message)
                    continue
                if target.route is not None and target.pool_mode is not db.pool_mode:
                    target.route.leftover = True
                client.pool = target.pool
                client.db_route = target.route
                client.function_catalog = self.function_catalog(client, target)

    def _made_by_an_entry(self, pool: Pool) -> bool:
        """Some [databases] entry (of the current settings) makes pools like ``pool``: on a
        node of its cluster, of its real database, as its server user."""
        databases = self.settings.databases.items()
        return any(self._entry_makes(db, db.dbname or (None if name == "*" else name), pool) for name, db in databases)

    def _note_leftover_pools(self, old: Settings) -> None:
        """After a reload: pools of the settings file's entries that no entry makes any more
        (of an entry removed, or in a pool mode changed) keep no minimum open and are retired
        once no client uses them (_sweep_leftovers), as PgBouncer's RELOAD closes the server
        connections of a database removed from its file; one an entry makes again is kept."""
        for pool in self.pools.pools.values():
            if pool.retired or pool.db is None:
                continue
            if pool.db.cluster not in old.clusters and pool.db.cluster not in self.settings.clusters:
                continue  # a registry tenant's
            if self._made_by_an_entry(pool):
                self.leftover_pools.discard(pool)
            elif pool not in self.leftover_pools:
                self.leftover_pools.add(pool)
                pool.settings = replace(pool.settings, min_size=0)

    def _sweep_leftovers(self) -> None:
        """On each janitor pass: a leftover pool no client points at (nor waits in) is
        retired, closing its connections; a removed cluster no client uses any more has its
        lag monitor stopped and, unless a reload has brought the name back, its function
        catalogs forgotten."""
        if not self.leftover_pools and not self.leftover_clusters:
            return
        pools: set[Pool] = set()
        splits: set[int] = set()
        clusters: set[str] = set()
        for client in self.clients.values():
            for pool in (client.pool, None if client.server is None else client.server.pool):
                if pool is not None:
                    pools.add(pool)
                    if pool.db is not None:
                        clusters.add(pool.db.cluster)
            route = client.db_route
            if route is not None:
                pools.update(route.pools())
                splits.add(id(route.split))
        for pool in [pool for pool in self.leftover_pools if pool not in pools and not pool.waiters]:
            self.leftover_pools.discard(pool)
            if not pool.retired:  # (a later reload's move may have retired it already)
                pool.retire()
        kept = []
        for name, split in self.leftover_clusters:
            if (split is not None and id(split) in splits) or (name in clusters and name not in self.settings.clusters):
                kept.append((name, split))
                continue
            if split is not None:
                self.spawn(split.stop())
            if name not in self.settings.clusters:
                for key in self.catalogs.keys():
                    if isinstance(key, tuple) and key[0] == name:
                        self.spawn(self.catalogs.forget(key))
            log.info("cluster %s: removed by a reload, and no client uses it any more", name)
        self.leftover_clusters = kept

    def _entry_makes(self, db: DatabaseConfig, real: str | None, pool: Pool) -> bool:
        """Entry ``db`` makes ``pool``, or one like it: on a node of its cluster, of real
        database ``real`` (None: any, the client's), as its server user when it names one,
        in its pool mode and server TLS."""
        key = pool.key
        cluster = self.settings.clusters[db.cluster]
        return (
            any((node.host, node.port) == (key.host, key.port) for node in (cluster.primary, *cluster.replicas))
            and real in (None, key.dbname)
            and db.server_user in (None, key.user)
            and self.pools.kind_of(db) == (key.mode, key.tls)
        )

    def _pool_in_use(self, pool: Pool) -> bool:
        """A client points at ``pool`` (its pool, or its server connection's): the janitor
        keeps a retired pool until none does, so that no connection escapes its care."""
        return any(
            client.pool is pool
            or (client.server is not None and client.server.pool is pool)
            or (client.db_route is not None and client.db_route.uses(pool))
            for client in self.clients.values()
        )

    def _repoint_pools(self, before: DatabaseConfig, db: DatabaseConfig) -> None:
        """The pools (and read/write routes) made for entry ``before`` follow ``db``."""
        for pool in self.pools.pools.values():
            if pool.db is before:
                pool.db = db
                if before.server_password != db.server_password:
                    pool.password = db.server_password
                    self.catalogs.set_password((db.cluster, pool.key.dbname), pool.key.user, db.server_password)
        for route in self.db_routes.values():
            if route.db is before:
                route.db = db

    def _keep_old_mode_pools(self, before: DatabaseConfig, db: DatabaseConfig) -> None:
        """A reload changed entry ``before``'s pool mode: its pools (and read/write routes)
        stay for the clients already in, with ``db``'s live values but no connections kept
        open for min_pool_size; new logins get pools in the new mode."""
        for route in self.db_routes.values():
            if route.db is before:
                route.leftover = True
        self._repoint_pools(before, db.model_copy(update={"pool_mode": before.pool_mode, "min_pool_size": 0}))

    def _open_min_pool(self, db: DatabaseConfig, name: str) -> None:
        """A database added by a reload: its pool exists now, as at start, to keep
        min_pool_size (when its server user is fixed and the name is not the wildcard)."""
        if db.server_user and name != "*":
            self.pools.pool_for(db, name, db.server_user, self.settings.clusters[db.cluster].primary)

    def reload_file(self) -> dict[str, list[str]] | dict[str, str]:
        """Re-read the settings file and ``reload()`` it (a worker's sibling asked)."""
        from router.config import load_settings

        try:
            settings = load_settings(self.config_path)
        except (OSError, ValueError) as exc:
            log.error("reload failed, settings unchanged: %s", exc)
            return {"error": f"configuration not reloaded: {exc}"}
        return self.reload(settings)

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
        # A worker's process ids are ≡ its index (mod workers): a sibling receiving a
        # CancelRequest knows whose it is (frontend/cancel.py).
        index, count = (self.worker.index, self.worker.count) if self.worker is not None else (0, 1)
        pid = issue_pid(index, count, self.clients.__contains__)
        self.clients[pid] = client
        return pid, new_cancel_key()

    def share(self, total: int, minimum: int = 1) -> int:
        """This process's part of a limit set for the whole router (a tenant's pool size)."""
        return total if self.worker is None else self.worker.part(total, minimum=minimum)

    def note_pinned(self, client: ClientConnection) -> None:
        if client.pins:
            self.pinned_clients.add(client)
        else:
            self.pinned_clients.discard(client)

    def forget_client(self, client: ClientConnection) -> None:
        self.pinned_clients.discard(client)
        self.tenants.forget(client)
        if getattr(client, "admitted", False):
            client.admitted = False
            self.client_count -= 1
        if self.clients.get(client.cancel_pid) is client:
            del self.clients[client.cancel_pid]

    def cancel(self, pid: int, key: int, *, from_sibling: bool = False) -> asyncio.Task | None:
        """A CancelRequest: cancel what that client runs now, if anything. A key another worker
        issued goes to it; one nobody here issued, to the other instances (frontend/cancel.py);
        else it is ignored, as PostgreSQL does for a key it does not know. Returns the task
        that delivers it, if any: done once the server (or the worker, or Redis) has it."""
        client = self.clients.get(pid)
        done = None
        if client is not None and client.matches_cancel_key(key):
            outcome = CancelOutcome.LOCAL
            done = self._cancel_client(client)
        elif not from_sibling and self.worker is not None and self.worker.owner_of(pid) != self.worker.index:
            from router.workers.control import forward_cancel

            outcome = CancelOutcome.FORWARDED
            done = self.spawn(forward_cancel(self.worker, self.worker.owner_of(pid), pid, key))
        elif self.cancel_relay is not None:
            outcome = CancelOutcome.RELAYED
            done = self.spawn(self.cancel_relay.publish(pid, key))
        else:
            outcome = CancelOutcome.UNKNOWN
            log.info("ignoring CancelRequest with unknown key")
        self.cancel_outcomes[outcome] += 1
        return done

    def cancel_relayed(self, pid: int, key: int) -> None:
        """A CancelRequest another instance relayed: cancel it if the key is ours, else
        ignore it quietly (every instance hears every relayed key)."""
        client = self.clients.get(pid)
        if client is not None and client.matches_cancel_key(key):
            self.cancel_outcomes[CancelOutcome.LOCAL] += 1
            self._cancel_client(client)

    def _cancel_client(self, client: ClientConnection) -> asyncio.Task | None:
        server = client.server
        if server is None:
            client.cancel_waiting()
            return None
        if server.pending == 0:
            return None
        return self.cancel_query(server)

    def pause_database(self, name: str) -> None:
        """The admin console's PAUSE: the next transactions of clients of database ``name``
        ("": of every client) wait at a gate until resume_database."""
        if name not in self.db_gates:
            log.info("database %s paused: new transactions wait", name or "(all)")
            self.db_gates[name] = Gate(f"database {name}" if name else "every database")

    def resume_database(self, name: str) -> None:
        """RESUME: open the gate of ``name``; "" opens every gate PAUSE set."""
        for key in [name] if name else list(self.db_gates):
            gate = self.db_gates.pop(key, None)
            if gate is not None:
                log.info("database %s resumed: releasing %d waiting transactions", key or "(all)", len(gate.waiters))
                gate.open()

    def known_database(self, name: str) -> bool:
        """Whether PAUSE/RESUME may name ``name`` ("" is every database)."""
        databases = self.settings.databases
        return not name or name in databases or "*" in databases

    async def pause_database_everywhere(self, name: str) -> int:
        """PAUSE in this process and every worker, then wait (up to tenant_drop_timeout) until
        no client of the database holds a server connection; returns how many still do."""
        # Paused again on each pass: a restarted worker is paused too.
        return await self._until_none_left("PAUSE", name)

    async def resume_database_everywhere(self, name: str) -> None:
        await self.database_command_everywhere("RESUME", name)

    def database_pools(self, name: str) -> list[Pool]:
        """The pools serving settings-file database ``name`` ("": every pool): on its
        cluster's nodes, of its real database, as its server user when the entry names one,
        in its pool mode and server TLS. (Another entry naming the same real database and
        user, in the same mode and TLS, shares them.)"""
        pools = list(self.pools.pools.values())
        if not name:
            return pools
        databases = self.settings.databases
        db = databases.get(name) or databases.get("*")
        if db is None:
            return []
        real = db.dbname or name
        return [pool for pool in pools if self._entry_makes(db, real, pool)]

    def database_command(self, verb: str, name: str) -> int:
        """The console's PAUSE, RESUME, DISABLE, ENABLE, KILL, RECONNECT and WAIT_CLOSE of
        database ``name`` ("": every database, for PAUSE, RESUME, RECONNECT, WAIT_CLOSE), and
        KILL_CLIENT of the client whose id ``name`` is, in this process (PgBouncer's
        commands). Returns a count: the clients still holding a server connection after
        PAUSE, those KILL or KILL_CLIENT disconnected, the server connections RECONNECT
        marked, or those WAIT_CLOSE still waits for."""
        if verb == "PAUSE":
            self.pause_database(name)
            return self.database_in_flight(name)
        if verb == "RESUME":
            self.resume_database(name)
            return 0
        if verb == "DISABLE":
            if name not in self.disabled_databases:
                log.info("database %s disabled: new logins are refused", name)
                self.disabled_databases.add(name)
            return 0
        if verb == "ENABLE":
            if name in self.disabled_databases:
                log.info("database %s enabled: new logins are accepted", name)
                self.disabled_databases.discard(name)
            return 0
        if verb == "KILL":
            # As PgBouncer: its clients go at once, and until RESUME new ones wait.
            self.pause_database(name)
            victims = [c for c in self.clients.values() if c.database == name and not c.console]
            for client in victims:
                client.fail(
                    RouterError(
                        SQLState.ADMIN_SHUTDOWN,
                        "terminating connection due to administrator command",
                        detail=f"KILL {name} in the admin console.",
                    )
                )
            for pool in self.database_pools(name):
                for server in list(pool.servers):
                    server.close(f"KILL {name}")
            log.warning("database %s killed: %d clients disconnected; new transactions wait for RESUME", name, len(victims))
            return len(victims)
        if verb == "KILL_CLIENT":
            return self.kill_client(int(name))
        if verb == "RECONNECT":
            return sum(pool.reconnect() for pool in self.database_pools(name))
        if verb == "WAIT_CLOSE":
            return sum(pool.closes_needed() for pool in self.database_pools(name))
        raise ValueError(f"unknown database command {verb!r}")

    async def database_command_everywhere(self, verb: str, name: str) -> int:
        """``database_command`` in this process and every other worker; the counts added up
        (a worker that does not answer counts 1)."""
        from router.workers.control import sibling_database_command

        count = self.database_command(verb, name)
        if self.worker is not None:
            count += sum(await sibling_database_command(self.worker, verb, name))
        return count

    async def wait_close_everywhere(self, name: str) -> int:
        """WAIT_CLOSE: until no server connection RECONNECT marked is left open, in any
        worker, or tenant_drop_timeout has passed; returns how many are still open."""
        return await self._until_none_left("WAIT_CLOSE", name)

    async def _until_none_left(self, verb: str, name: str) -> int:
        """Run ``verb`` everywhere until its count is 0, or tenant_drop_timeout has passed;
        the last count."""
        deadline = time.monotonic() + self.settings.tenant_drop_timeout
        while True:
            left = await self.database_command_everywhere(verb, name)
            if not left or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(0.05)

    def database_in_flight(self, name: str) -> int:
        """Clients of database ``name`` ("": any) holding a server connection."""
        return sum(1 for c in self.clients.values() if c.server is not None and (not name or c.database == name))

    def kill_client(self, client_id: int) -> int:
        """KILL_CLIENT: disconnect the client of that id (its cancel pid) with 57P01; a query
        it is running is cancelled, and its server connection, rolled back or closed, goes
        back as when a client leaves. Returns 1, or 0 if no client of this process has it."""
        client = self.clients.get(client_id)
        if client is None:
            return 0
        server = client.server
        if server is not None and server.pending:
            self.cancel_query(server)
        log.warning("client %s@%s/%s: KILL_CLIENT %d from the admin console", client.user, client.peer, client.database, client_id)
        client.fail(
            RouterError(
                SQLState.ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
                detail=f"KILL_CLIENT {client_id} in the admin console.",
            ),
            logged=True,
        )
        return 1

    def cancel_query(self, server: ServerConnection) -> asyncio.Task:
        """Send the server connection's backend a CancelRequest (in the background)."""
        server.cancels_in_flight += 1
        return self.spawn(self._send_cancel(server))

    def _tick(self, now: float) -> None:
        """Each pool janitor pass (PoolManager.on_tick)."""
        self.end_idle_clients(now)
        self._sweep_leftovers()

    def end_idle_clients(self, now: float) -> None:
        """client_idle_timeout, on each pool janitor pass: a client that has sent nothing
        while idle outside a transaction (ClientConnection.idle_session) for that long is
        disconnected. A client is marked as not heard from on each pass; anything it sends
        (data_received), or its being busy at a pass, starts its clock again."""
        timeout = self.settings.client_idle_timeout
        if not timeout:
            return
        for client in list(self.clients.values()):
            if client.heard or not client.idle_session:
                client.heard = False
                client.quiet_since = now
            elif now - client.quiet_since >= timeout:
                client.idle_session_timed_out(timeout)

    async def _send_cancel(self, server: ServerConnection) -> None:
        host, port = server.pool.key.host, server.pool.key.port
        try:
            async with asyncio.timeout(self.settings.server_connect_timeout):
                if is_unix_socket(host):
                    reader, writer = await asyncio.open_unix_connection(unix_socket_path(host, port))
                else:
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

    def resolve_database(self, client: ClientConnection, attach: bool = True, pool_mode: PoolMode | None = None) -> Target:
        """The pool (and read/write route) that serves ``client`` now. ``pool_mode``: the
        file entry's pools in that mode rather than the entry's own (a client that logged in
        before a reload changed the mode, moved with the entry)."""
        tenant = client.tenant
        if tenant is not None:
            db = self.tenants.database_config(tenant, client.tenant_login.database)
            if tenant.auth_query:
                # Pools per login, logging in as the client with its SCRAM keys.
                db = db.model_copy(update={"server_user": client.user, "server_password": None})
            cluster = self.tenants.cluster_config(tenant)
            split = self.splits.get(db.cluster)
            pool = self.pools.pool_for(db, db.dbname, db.server_user, cluster.primary)
            if tenant.auth_query and client.scram_keys is not None:
                pool.scram_keys = client.scram_keys
            if attach:
                self.tenants.attach(client, pool)
        else:
            databases = self.settings.databases
            db = databases.get(client.database) or databases.get("*")
            if db is None:
                raise RouterError(SQLState.INVALID_CATALOG_NAME, f'database "{client.database}" does not exist')
            if self.disabled_databases and client.database in self.disabled_databases:
                raise RouterError(
                    SQLState.OBJECT_NOT_IN_PREREQUISITE_STATE,
                    f'database "{client.database}" is not currently accepting connections',
                    detail="DISABLE in the admin console; ENABLE lets new logins in again.",
                )
            if pool_mode is not None and db.pool_mode is not pool_mode:
                db = db.model_copy(update={"pool_mode": pool_mode, "min_pool_size": 0})
            cluster = self.settings.clusters[db.cluster]
            pool = self.pools.pool_for(db, client.database, client.user, cluster.primary)
            split = self.splits.get(db.cluster)
        route = None
        if split is not None:
            key = (db.cluster, pool.key)
            route = self.db_routes.get(key)
            if route is None:
                route = self.db_routes[key] = DatabaseRoute(self, db, client.database, client.user, pool, split)
        return Target(db, pool, pool.settings.mode, route)

    def function_catalog(self, client: ClientConnection, target: Target) -> CatalogWatch | None:
        """Transaction mode: the kept-current function catalog of the database the client's
        server connections use. A call of a function whose body may change settings pins the
        client (ClientConnection._track_pins), as the DO block doing it would. Registered at
        the first login that reached the database (so it exists); None in session mode, and
        for auth_query tenants (no password to read pg_proc with)."""
        if target.pool_mode is not PoolMode.TRANSACTION:
            return None
        if target.route is not None:
            return self.catalogs.watch(target.route.catalog_key)
        tenant = client.tenant
        if tenant is not None and tenant.auth_query:
            return None
        db, pool = target.database, target.pool
        key = (db.cluster, pool.key.dbname)
        watch = self.catalogs.watch(key)
        if watch is None or self.catalogs.reads_from(key) != (pool.key.host, pool.key.port):
            # (Registered again when a reload has moved the cluster's primary.)
            if tenant is not None:
                tls = asyncpg_ssl(tenant)
            else:
                tls = asyncpg_tls(db.server_tls or self.settings.server_tls, db.server_tls_ca or self.settings.server_tls_ca)
            params = ConnectParams(pool.key.host, pool.key.port, pool.key.dbname, pool.key.user, db.server_password, tls)
            self.catalogs.register(key, params)
            watch = self.catalogs.watch(key)
        if pool.on_undefined_function is None:
            # The function may be new (created since the last read): read the catalog again.
            pool.on_undefined_function = lambda: self.catalogs.invalidate(key)
        return watch

    def retarget(self, client: ClientConnection) -> None:
        """Point a connected client of a moved tenant at its new cluster/database."""
        tenant = client.tenant
        if tenant.tenant_id != "*":
            client.tenant_login.database = tenant.database
        if tenant.cluster.replicas and self.tenants.cluster_name(tenant) not in self.splits:
            self.spawn(self.prepare_tenant(client))  # reads use the primary until it is ready
        target = self.resolve_database(client, attach=False)
        client.pool = target.pool
        client.db_route = target.route
        client.function_catalog = self.function_catalog(client, target)
        self.tenants.note_pool(client, target.pool)

    async def prepare_tenant(self, client: ClientConnection) -> None:
        """Before a tenant's first client is served: its cluster's monitor, when it has
        replicas, has sampled the nodes (so the first reads already go to replicas)."""
        tenant = client.tenant
        if tenant is None or not tenant.cluster.replicas:
            return
        name = self.tenants.cluster_name(tenant)
        starting = self._split_starts.get(name)
        if starting is None:
            split = self.splits[name] = SplitCluster(
                name, self.tenants.cluster_config(tenant), self.settings, ssl=asyncpg_ssl(tenant),
                write_times=self.write_times,
            )  # fmt: skip
            starting = self._split_starts[name] = self.spawn(split.start())
        await asyncio.shield(starting)

    def pool_for_transaction(self, client: ClientConnection) -> Pool:
        """The pool that serves ``client``'s next transaction, judged from the messages it
        holds (``client._held``). Raises RouterError when no node can take it."""
        if self.db_gates:  # the console's PAUSE
            gate = self.db_gates.get("") or self.db_gates.get(client.database)
            if gate is not None:
                raise TenantPaused(gate)
        tenant = client.tenant
        if tenant is not None:
            gate = self.tenants.gates.get(tenant.tenant_id)
            if gate is not None:
                raise TenantPaused(gate)
            if tenant.limits.statements_per_second is not None:
                self.tenants.check_rate(tenant)
        route = client.db_route
        if route is None:
            return client.pool
        split = route.split
        route.current_catalog()
        if client.pool_mode is PoolMode.SESSION:
            return route.pool(split.primary())
        held = client._held
        if (
            len(held) == 1
            and client.deferred_begin is None
            and client.session_target is None
            and not client.read_only_session
            and not client.pins
        ):
            # The commonest transaction: a lone plain SELECT (a Query, or an unnamed Parse to
            # Sync), autocommit, in a session with nothing that steers it. decide() would say
            # (replica, read); this skips the scan.
            data, start, syncs, _ = held[0]
            sql = lone_statement_sql(data) if not start and syncs == 1 else None
            if sql is not None and route.verdicts.verdict(sql) is PLAIN_READ:
                if data[0] != _Q:
                    client.last_unnamed = PLAIN_READ  # what a later unnamed Bind runs
                node, _why = split.replica(client)
                if node is not None:
                    split.decisions[_REPLICA_READ] += 1
                    node.in_flight += 1
                    client.replica_node = node
                    return route.pool(node)
        first, combined, client.last_unnamed = held_verdict(
            client._held, route.verdicts.verdict, client.statement_sql, client.last_unnamed
        )
        read_only = client.read_only_session if client.deferred_begin is None else client.deferred_read_only
        if (
            client.deferred_begin is not None
            and not self.first_statement
            and not read_only
            and (first is None or first.kind is not StatementKind.SET_TRANSACTION_READ_ONLY)
        ):
            # Conservative: BEGIN; ... runs on the primary. Whether it writes (read-your-writes)
            # is judged from its statements as they come (ClientConnection._forward).
            node = split.primary()
            split.decisions["primary", RouteReason.WRITE] += 1
            client.wrote = combined is not None and combined.target is NodeKind.PRIMARY
            client.watch_writes = not client.wrote
            return route.pool(node)
        else:
            # (A deferred BEGIN's transaction is read-only as the session was at the BEGIN.)
            target, reason = decide(
                first,
                combined,
                session_target=client.session_target,
                read_only_session=read_only,
                pinned=bool(client.pins),
            )
        if target is NodeKind.REPLICA and reason is RouteReason.READ and client.unsynced and open_segment(held) != FLUSHES:
            # Its Sync has not come (route.open_segment): after a round trip, or past what
            # waits for the Sync, a write may still join its implicit transaction.
            target, reason = NodeKind.PRIMARY, RouteReason.WRITE
        if target is NodeKind.REPLICA:
            node, why = split.replica(client)
            if node is not None:
                split.decisions["replica", reason] += 1
                node.in_flight += 1
                client.replica_node = node
                return route.pool(node)
            split.fallback(why, client)
            reason = why
        node = split.primary()
        split.decisions["primary", reason] += 1
        # Read-your-writes: did it write? Hinted statements count (the hint hides the rest).
        client.wrote = combined is not None and combined.target is NodeKind.PRIMARY
        client.watch_writes = not client.wrote
        return route.pool(node)
