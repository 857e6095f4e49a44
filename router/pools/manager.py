"""All pools of the router, found by key, and the janitor that keeps them trim."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from router.config import DatabaseConfig, PoolMode, ServerTLS, Settings
from router.pools.pool import ConnectionCap, Pool, PoolKey, PoolSettings
from router.sockopts import keepalive_options
from router.stats.traffic import Traffic

log = logging.getLogger("pgrouter.pool")

# How often idle connections are checked against server_idle_timeout / server_lifetime and
# pools are topped up to min_pool_size. Timeouts are minutes by default; 1 s is plenty.
JANITOR_INTERVAL = 1.0


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    return tls_context(settings.server_tls, settings.server_tls_ca)


def tls_context(mode: ServerTLS, ca) -> ssl.SSLContext | None:
    """A client-side context for server connections in ``mode`` (libpq's sslmode meanings)."""
    if mode is ServerTLS.DISABLE:
        return None
    if mode is ServerTLS.VERIFY_FULL:
        ctx = ssl.create_default_context(cafile=str(ca))
    else:
        # prefer / require: encrypt, but do not verify the certificate (libpq's meaning).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def asyncpg_tls(mode: ServerTLS, ca):
    """asyncpg's ``ssl`` argument for a ``server_tls`` mode, for the router's own control
    connections (lag monitor, function catalogs): as the pools connect."""
    if mode is ServerTLS.DISABLE:
        return False
    if mode is ServerTLS.PREFER:
        return "prefer"  # an SSLContext would make asyncpg insist on TLS
    return tls_context(mode, ca)


class PoolManager:
    def __init__(self, settings: Settings, validated_statements: set[bytes] | None = None) -> None:
        self.settings = settings
        self.validated_statements = validated_statements
        self.pools: dict[PoolKey, Pool] = {}
        self._tls = server_tls_context(settings)
        self._tls_contexts: dict[tuple, ssl.SSLContext | None] = {}  # per-database overrides
        self._janitor: asyncio.Task | None = None
        # Called on every janitor pass with its time (the router's client_idle_timeout).
        self.on_tick: Callable[[float], None] | None = None
        # Whether a client still points at a pool (Router: its pool or server's): a retired
        # pool is kept, and maintained, until none does.
        self.pool_in_use: Callable[[Pool], bool] = lambda pool: False
        self.passes = 0  # janitor passes done
        # max_db_connections / max_user_connections, by (setting, host, port, name).
        self.caps: dict[tuple[str, str, int, str], ConnectionCap] = {}
        # SHOW STATS counters by the database name clients use (a tenant's id), kept when
        # its clients go (a dropped tenant's): totals only grow. The current period began at
        # _period_start.
        self.traffic: dict[str, Traffic] = {}
        self._period_start = time.monotonic()

    def pool_for(self, db: DatabaseConfig, client_dbname: str, client_user: str, node) -> Pool:
        dbname = db.dbname or client_dbname
        user = db.server_user or client_user
        mode, tls = self.kind_of(db)
        key = PoolKey(node.host, node.port, dbname, user, mode, tls)
        pool = self.pools.get(key)
        if pool is None:
            s = self.settings
            pool = Pool(
                key,
                db.server_password,
                PoolSettings(
                    mode=mode,
                    reset_query=s.server_reset_query,
                    tls=self._tls if db.server_tls is None else self._tls_for(db.server_tls, db.server_tls_ca),
                    tls_required=(db.server_tls or s.server_tls) not in (ServerTLS.PREFER, ServerTLS.DISABLE),
                    channel_binding=s.server_channel_binding,
                    application_name=s.server_application_name,
                    max_prepared_statements=s.max_prepared_statements,
                    socket_options=keepalive_options(s),
                    **self.live_settings(db),
                ),
                self.validated_statements,
            )
            pool.db = db
            pool.caps = self._caps_for(pool)
            self.pools[key] = pool
        return pool

    def traffic_for(self, database: str) -> Traffic:
        """The SHOW STATS counters of ``database``, a name clients use (or a tenant's id)."""
        traffic = self.traffic.get(database)
        if traffic is None:
            traffic = self.traffic[database] = Traffic()
        return traffic

    def kind_of(self, db: DatabaseConfig) -> tuple[PoolMode, str]:
        """The mode and TLS of ``db``'s pools (PoolKey): entries of one real database in
        two modes, or one with server TLS of its own, get pools of their own, as a shared
        pool would give them the first one's."""
        s = self.settings
        tls = ""
        if db.server_tls is not None and (db.server_tls, db.server_tls_ca) != (s.server_tls, s.server_tls_ca):
            tls = " ".join(filter(None, (db.server_tls.value, str(db.server_tls_ca or ""))))
        return db.pool_mode or s.pool_mode, tls

    def live_settings(self, db: DatabaseConfig) -> dict:
        """The pool settings a reload changes, for a pool of ``db`` (its own values first,
        then the global ones): at creation, and again at each reload."""
        s = self.settings
        size = db.pool_size or s.pool_size
        min_size = s.min_pool_size if db.min_pool_size is None else db.min_pool_size
        return {
            "size": size,
            "min_size": min(min_size, size),
            "query_wait_timeout": db.query_wait_timeout or s.query_wait_timeout,
            "idle_timeout": s.server_idle_timeout,
            "lifetime": s.server_lifetime,
            "connect_timeout": s.server_connect_timeout,
            "reserve_size": s.reserve_pool_size if db.reserve_pool_size is None else db.reserve_pool_size,
            "reserve_timeout": s.reserve_pool_timeout,
        }

    def _caps_for(self, pool: Pool) -> tuple[ConnectionCap, ...]:
        """The caps a new pool counts towards (none when both settings are 0)."""
        key = pool.key
        caps = []
        db = pool.db
        if db is not None and db.cluster not in self.settings.clusters:
            # A registry tenant's pool: the tenant's own cap, else the global one.
            db_limit = self.settings.max_db_connections if db.max_db_connections is None else db.max_db_connections
        else:
            db_limit = self._max_db_connections(key.dbname)
        for setting, limit, name in (
            ("max_db_connections", db_limit, key.dbname),
            ("max_user_connections", self.settings.max_user_connections, key.user),
        ):
            if not limit:
                continue
            cap_key = (setting, key.host, key.port, name)
            cap = self.caps.get(cap_key)
            if cap is None:
                what = "database" if setting == "max_db_connections" else "user"
                cap = self.caps[cap_key] = ConnectionCap(setting, f"{what} {name} on {key.host}:{key.port}", limit)
            elif limit < cap.limit:
                cap.limit = limit  # a tenant's and an entry's pools of one database: the smaller
            cap.pools.append(pool)
            caps.append(cap)
        return tuple(caps)

    def recap(self) -> None:
        """A reload: every pool counts towards the caps of the current settings (raised,
        lowered, added or removed). Pools over a lowered cap close idle connections now and
        busy ones as they come back; waiting clients get the room a raised size or cap (or
        one removed) makes."""
        self.caps = {}
        pools = list(self.pools.values())
        for pool in pools:
            pool.caps = self._caps_for(pool)
        for cap in self.caps.values():
            cap.trim()
            cap.slot_freed()
        for pool in pools:
            if pool.waiters and not pool.retired:
                pool.open_for_waiters()

    def _max_db_connections(self, dbname: str) -> int:
        """The cap of a real database: the smallest set by the [databases] entries that
        name it (their own, else the global), 0 for none; else the wildcard entry's; else
        (a registry tenant's, say) the global."""
        default = self.settings.max_db_connections
        databases = self.settings.databases
        entries = [db for name, db in databases.items() if name != "*" and (db.dbname or name) == dbname]
        if not entries and "*" in databases:
            entries = [databases["*"]]
        if not entries:
            return default
        limits = [default if db.max_db_connections is None else db.max_db_connections for db in entries]
        return min((limit for limit in limits if limit), default=0)

    def _done_with(self, pool: Pool) -> bool:
        """A retired pool (its node left its cluster): what it opened since closes too, as
        a client may still use it (one that was logging in at the reload, say); done once it
        holds nothing and no client points at it."""
        pool.reconnect()
        return not pool.servers and not pool.connecting and not pool.waiters and not self.pool_in_use(pool)

    def drop(self, pool: Pool) -> None:
        """Forget a closed pool (a deleted tenant's): its connections no longer count."""
        self.pools.pop(pool.key, None)
        for cap in pool.caps:
            if pool in cap.pools:
                cap.pools.remove(pool)
            cap.slot_freed()

    def _tls_for(self, mode: ServerTLS, ca) -> ssl.SSLContext | None:
        key = (mode, str(ca))
        if key not in self._tls_contexts:
            self._tls_contexts[key] = tls_context(mode, ca)
        return self._tls_contexts[key]

    def start(self) -> None:
        # Pools whose server user is fixed by configuration exist from the start, so that
        # min_pool_size connections are open before the first client arrives.
        for name, db in self.settings.databases.items():
            if db.server_user and name != "*":
                cluster = self.settings.clusters[db.cluster]
                self.pool_for(db, name, db.server_user, cluster.primary)
        self._janitor = asyncio.get_running_loop().create_task(self._run_janitor())

    async def _run_janitor(self) -> None:
        while True:
            now = time.monotonic()
            idle_transaction_timeout = self.settings.idle_transaction_timeout
            query_timeout = self.settings.query_timeout
            for pool in list(self.pools.values()):
                try:
                    if pool.retired and self._done_with(pool):
                        self.drop(pool)
                        continue
                    pool.maintain(now)
                    if idle_transaction_timeout:
                        pool.end_idle_transactions(now, idle_transaction_timeout)
                    if query_timeout:
                        pool.end_long_queries(now, query_timeout)
                except Exception:
                    log.exception("janitor failed on pool %s", pool.name)
            if now - self._period_start >= self.settings.stats_period:
                for traffic in self.traffic.values():
                    traffic.close_period(now - self._period_start)
                self._period_start = now
            self.passes += 1
            if self.on_tick is not None:
                try:
                    self.on_tick(now)
                except Exception:
                    log.exception("janitor failed on clients")
            await asyncio.sleep(JANITOR_INTERVAL)

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            try:
                await self._janitor
            except asyncio.CancelledError:
                pass
        for pool in self.pools.values():
            await pool.close()
