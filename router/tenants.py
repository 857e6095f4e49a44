"""Tenants from the Redis registry (router/registry/), as the router uses them: which tenant a
client logs into, where its transactions go, and what happens when an operator pauses, resumes
or deletes it.

Which tenant a client wants (README "Tenants"): the startup option ``pgrouter.tenant``
(``options=-c pgrouter.tenant=acme``) if given, else the host name the client asked for over
TLS (SNI ``acme.db.example.com`` under ``tenant_sni_suffix = "db.example.com"``) when tenant
``acme`` exists, else a user name of the form ``alice.acme`` (when tenant ``acme`` exists),
else the database name. A database name that is configured in
the settings file (``[databases.NAME]``) is served from there, not from the registry. A name no
tenant claims goes to the fallback tenant ``*`` if there is one, under the requested database
name; otherwise the client gets 3D000 after a full password exchange (no tenant enumeration).

Every router instance applies registry changes as they arrive over pub/sub (TenantCache's
``on_change``): a paused tenant's new transactions wait until it is resumed; a deleted tenant's
running transactions may finish within ``tenant_drop_timeout``, then its clients are
disconnected and its pools closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from router.config import (
    AuthMethod,
    ClusterConfig,
    DatabaseConfig,
    NodeAddress,
    ReplicaFallback,
)
from router.protocol.errors import RouterError, SQLState
from router.registry.cache import TenantCache
from router.registry.crypto import Keyring
from router.registry.errors import TenantNotFound
from router.registry.models import FALLBACK_TENANT_ID, Tenant, TenantMode
from router.registry.store import RedisStore
from router.session import _options_settings

if TYPE_CHECKING:
    from router.app import Router
    from router.frontend.client import ClientConnection
    from router.pools.pool import Pool

log = logging.getLogger("pgrouter.tenants")

TENANT_OPTION = "pgrouter.tenant"
# auth_query: the login's SCRAM verifier, if the role may log in now.
AUTH_QUERY = """
SELECT rolpassword FROM pg_catalog.pg_authid
WHERE rolname = $1 AND rolcanlogin AND (rolvaliduntil IS NULL OR rolvaliduntil > now())
"""


@dataclass(slots=True)
class TenantLogin:
    """What login learnt: the tenant (None: unknown), the client's login within it, and the
    real database name (the fallback tenant serves the requested one)."""

    tenant: Tenant | None
    user: str
    auth: AuthMethod
    secret: str | None  # SCRAM verifier or md5 hash; None for trust or an unknown login
    known: bool  # tenant and user both exist
    database: str


def sni_tenant_id(server_name: str | None, suffix: str | None) -> str | None:
    """The tenant a TLS SNI host name names under ``suffix``: ``acme`` for
    ``acme.db.example.com`` under ``db.example.com`` (one label, any case); else None."""
    if not server_name or not suffix:
        return None
    name = server_name.rstrip(".").lower()
    label, dot, rest = name.partition(".")
    if not dot or rest != suffix or not label:
        return None
    return label


class TenantPaused(Exception):
    """Raised by Router.pool_for_transaction: the client waits at ``gate``."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate


class Gate:
    """The clients whose transactions wait while their tenant is paused, in arrival order."""

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.waiters: deque[ClientConnection] = deque()

    def add(self, client: ClientConnection) -> None:
        self.waiters.append(client)

    def cancel_wait(self, client: ClientConnection) -> None:
        try:
            self.waiters.remove(client)
        except ValueError:
            pass

    def open(self) -> None:
        waiters, self.waiters = self.waiters, deque()
        for client in waiters:
            client.gate_opened(self)


def asyncpg_ssl(tenant: Tenant):
    """asyncpg's ``ssl`` argument for the tenant's cluster TLS setting."""
    from router.pools.manager import asyncpg_tls

    return asyncpg_tls(tenant.cluster.tls, tenant.cluster.tls_ca)


class MoveTimeout(Exception):
    """A tenant move gave up: transactions were still running at the deadline."""


class RateLimit:
    """A token bucket: ``rate`` transactions per second, bursts up to one second's worth."""

    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = max(1.0, rate)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class TenantManager:
    def __init__(self, router: Router) -> None:
        self.router = router
        settings = router.settings
        self.settings = settings
        self.enabled = settings.redis_url is not None
        self.store: RedisStore | None = None
        self.cache: TenantCache | None = None
        self.gates: dict[str, Gate] = {}  # paused tenants
        self.clients: dict[str, set[ClientConnection]] = {}
        self.pools: dict[str, set[Pool]] = {}  # pools each tenant's clients used
        self.rates: dict[str, RateLimit] = {}

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled:
            return
        s = self.settings
        if s.secret_key is None:
            raise ValueError("redis_url is set but secret_key is not (PGROUTER_SECRET_KEY=kid:base64key)")
        keyring = Keyring.from_specs(
            s.secret_key.get_secret_value(), [k.get_secret_value() for k in s.old_secret_keys]
        )
        self.store = RedisStore.from_url(s.redis_url, keyring, prefix=s.registry_prefix)
        self.cache = TenantCache(self.store, ttl=s.registry_cache_ttl, on_change=[self._changed])
        self.cache.start()
        try:
            await self.cache.wait_synced(timeout=2.0)
        except TimeoutError:
            log.warning("tenant registry at %s not reachable yet; continuing", s.redis_url)

    async def stop(self) -> None:
        if self.cache is not None:
            await self.cache.stop()
        if self.store is not None:
            await self.store.close()

    # --- login ------------------------------------------------------------------------

    def wants_registry(self, client: ClientConnection) -> bool:
        return self.enabled and client.database not in self.settings.databases

    async def login(self, client: ClientConnection) -> TenantLogin:
        """Find the tenant and login ``client`` asks for. Raises RegistryUnavailable when Redis
        is down and the tenant is not cached."""
        assert self.cache is not None
        user, tenant_id = self._split_name(client)
        database = client.database
        tenant = None
        if tenant_id is None:
            # acme.db.example.com (TLS SNI, tenant_sni_suffix), when tenant acme exists.
            sni_tenant = sni_tenant_id(client.tls_server_name, self.settings.tenant_sni_suffix)
            if sni_tenant is not None:
                tenant = await self._get(sni_tenant)
        if tenant is None and tenant_id is None:
            # alice.acme: the suffix names a tenant only if that tenant exists.
            base, dot, suffix = client.user.rpartition(".")
            if dot and base:
                tenant = await self._get(suffix)
                if tenant is not None:
                    user = base
            if tenant is None:
                tenant_id = database
        if tenant is None and tenant_id is not None:
            tenant = await self._get(tenant_id)
        if tenant is None:
            fallback = await self._get(FALLBACK_TENANT_ID)
            if fallback is not None:
                tenant = fallback
        if tenant is None:
            return TenantLogin(None, user, AuthMethod.SCRAM, None, False, database)
        real_db = database if tenant.tenant_id == FALLBACK_TENANT_ID else tenant.database
        if tenant.auth_query:
            verifier = await self._auth_query(tenant, user)
            return TenantLogin(tenant, user, AuthMethod.SCRAM, verifier, verifier is not None, real_db)
        login = tenant.user(user)
        if login is None:
            return TenantLogin(tenant, user, AuthMethod.SCRAM, None, False, real_db)
        return TenantLogin(tenant, user, login.auth, login.verifier, True, real_db)

    async def _auth_query(self, tenant: Tenant, user: str) -> str | None:
        """The user's SCRAM verifier, read from pg_authid on the tenant's primary over a
        dedicated connection as the tenant's server_user (which must be allowed to read it: a
        superuser, or grant it a SECURITY DEFINER function and adapt AUTH_QUERY). None when
        the role is unknown, cannot log in, has expired, or has no SCRAM verifier (md5 or no
        password: refused, the router cannot log in as that user without the password)."""
        import asyncpg

        primary = tenant.cluster.primary
        try:
            conn = await asyncpg.connect(
                host=primary.host, port=primary.port, database=tenant.database,
                user=tenant.server_user,
                password=tenant.server_password.get_secret_value() if tenant.server_password else None,
                timeout=self.settings.server_connect_timeout, ssl=asyncpg_ssl(tenant),
                server_settings={"application_name": "pgrouter-auth-query"},
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise RouterError(
                SQLState.CONNECTION_FAILURE,
                f'auth_query for tenant "{tenant.tenant_id}" could not reach its primary: {exc}',
            ) from exc
        try:
            verifier = await conn.fetchval(AUTH_QUERY, user)
        except asyncpg.PostgresError as exc:
            raise RouterError(
                SQLState.INVALID_AUTHORIZATION,
                f'auth_query for tenant "{tenant.tenant_id}" failed: {exc}',
            ) from exc
        finally:
            await conn.close()
        if verifier is None or not verifier.startswith("SCRAM-SHA-256$"):
            return None
        return verifier

    def _split_name(self, client: ClientConnection) -> tuple[str, str | None]:
        params = client.startup_params
        tenant_id = params.get(TENANT_OPTION) or _options_settings(params.get("options", "")).get(TENANT_OPTION)
        return client.user, tenant_id

    async def _get(self, tenant_id: str) -> Tenant | None:
        try:
            return await self.cache.get(tenant_id)
        except TenantNotFound:
            return None

    # --- where a tenant's transactions go ---------------------------------------------

    def database_config(self, tenant: Tenant, database: str) -> DatabaseConfig:
        return DatabaseConfig(
            cluster=self.cluster_name(tenant),
            dbname=database,
            server_user=tenant.server_user,
            server_password=(
                tenant.server_password.get_secret_value() if tenant.server_password else None
            ),
            pool_size=self.router.share(tenant.pool.size),  # this worker's part
            min_pool_size=self.router.share(tenant.pool.min_size, minimum=0),
            pool_mode=tenant.pool.mode,
            query_wait_timeout=tenant.limits.query_wait_timeout,
            max_db_connections=self._max_db_connections(tenant),
            reserve_pool_size=self._reserve_size(tenant),
            server_tls=tenant.cluster.tls,
            server_tls_ca=tenant.cluster.tls_ca,
        )

    def _max_db_connections(self, tenant: Tenant) -> int | None:
        """This worker's part of the tenant's cap, None when it sets none."""
        limit = tenant.limits.max_db_connections
        return None if limit is None else self.router.share(limit)

    def _reserve_size(self, tenant: Tenant) -> int | None:
        """This worker's part of the tenant's reserve, None when it sets none."""
        size = tenant.pool.reserve_size
        return None if size is None else self.router.share(size, minimum=0)

    @staticmethod
    def cluster_name(tenant: Tenant) -> str:
        nodes = [tenant.cluster.primary, *tenant.cluster.replicas]
        return "tenant-cluster:" + ",".join(f"{n.host}:{n.port}" for n in nodes)

    def cluster_config(self, tenant: Tenant) -> ClusterConfig:
        c = tenant.cluster
        return ClusterConfig(
            primary=NodeAddress(host=c.primary.host, port=c.primary.port),
            replicas=[NodeAddress(host=r.host, port=r.port, weight=r.weight) for r in c.replicas],
            max_replica_lag=tenant.limits.max_replica_lag,
            max_replica_lag_bytes=tenant.limits.max_replica_lag_bytes,
            replica_fallback=ReplicaFallback.PRIMARY,
            monitor_user=tenant.server_user,
            monitor_password=(
                tenant.server_password.get_secret_value() if tenant.server_password else None
            ),
            monitor_dbname=tenant.database,
        )

    def tenant_setting_sql(self, tenant: Tenant) -> str | None:
        """Shared mode: the statement that puts the tenant's key on a server connection."""
        if tenant.mode is not TenantMode.SHARED:
            return None
        name = self.settings.tenant_setting.replace("'", "''")
        return f"SELECT set_config('{name}', '{tenant.tenant_key}', false)"

    # --- clients ----------------------------------------------------------------------

    def attach(self, client: ClientConnection, pool: Pool) -> None:
        tenant = client.tenant
        clients = self.clients.setdefault(tenant.tenant_id, set())
        cap = self.router.share(tenant.limits.max_client_conn)  # this worker's part
        if len(clients) >= cap:
            raise RouterError(
                SQLState.TOO_MANY_CONNECTIONS,
                f'sorry, too many clients already for tenant "{tenant.tenant_id}" '
                f"(max_client_conn {cap})",
            )
        clients.add(client)
        tenant_id = tenant.tenant_id
        self.pools.setdefault(tenant_id, set()).add(pool)

    def note_pool(self, client: ClientConnection, pool: Pool) -> None:
        pools = self.pools.setdefault(client.tenant.tenant_id, set())
        if pool not in pools:
            pools.add(pool)

    def forget(self, client: ClientConnection) -> None:
        tenant = client.tenant
        if tenant is not None:
            clients = self.clients.get(tenant.tenant_id)
            if clients is not None:
                clients.discard(client)

    def check_rate(self, tenant: Tenant) -> None:
        """limits.statements_per_second, counted per transaction started (an autocommit
        statement is one): over it, the transaction fails with 53400 and the client may retry."""
        rate = tenant.limits.statements_per_second
        if rate is None:
            return
        if self.router.worker is not None:
            rate /= self.router.worker.count  # each worker its part of the tenant's rate
        bucket = self.rates.get(tenant.tenant_id)
        if bucket is None or bucket.rate != rate:
            bucket = self.rates[tenant.tenant_id] = RateLimit(rate)
        if not bucket.take():
            raise RouterError(
                SQLState.CONFIGURATION_LIMIT_EXCEEDED,
                f'tenant "{tenant.tenant_id}" is over its rate limit ({rate:g} statements per second)',
                severity="ERROR",
                hint="Retry after a short pause.",
            )

    def gate_for(self, tenant_id: str) -> Gate | None:
        return self.gates.get(tenant_id)

    # --- operator actions (through the registry, on every instance) ----------------------

    def _changed(self, tenant_id: str, tenant: Tenant | None) -> None:
        if tenant is None:
            self.router.spawn(self.drop(tenant_id, self.settings.tenant_drop_timeout))
            return
        self.apply(tenant)

    def apply(self, tenant: Tenant) -> None:
        """Bring this instance in line with ``tenant``'s record (pause state, login data, the
        sizes and wait timeout of the pools its clients use)."""
        self._resize_pools(tenant)
        for client in list(self.clients.get(tenant.tenant_id, ())):
            old = client.tenant
            client.tenant = tenant
            if old is not None and (old.cluster != tenant.cluster or old.database != tenant.database):
                self.router.retarget(client)  # moved: its next transactions go to the new place
        if tenant.paused:
            self.pause(tenant.tenant_id)
        else:
            self.resume(tenant.tenant_id)

    def _resize_pools(self, tenant: Tenant) -> None:
        """pool.size, pool.min_size, pool.reserve_size, limits.query_wait_timeout and
        limits.max_db_connections apply to the tenant's existing pools at once, on its
        replicas too. A new pool.mode applies to new logins, which get pools in that mode
        (PoolKey); the clients already in keep theirs, which they may depend on mid-session,
        and the old mode's pools keep no idle connections open for them. A pool shared with
        other tenants (shared schema) follows the record changed last."""
        share = self.router.share
        update = {
            "pool_size": share(tenant.pool.size),
            "min_pool_size": share(tenant.pool.min_size, minimum=0),
            "query_wait_timeout": tenant.limits.query_wait_timeout,
            "max_db_connections": self._max_db_connections(tenant),
            "reserve_pool_size": self._reserve_size(tenant),
        }
        primaries = self.pools.get(tenant.tenant_id, set())
        pools = set(primaries)
        for route in self.router.db_routes.values():
            if route.primary_pool in primaries:
                # Its pools on the replicas (and those it opens later, from route.db) alike.
                own = update if route.primary_pool.key.mode is tenant.pool.mode else {**update, "min_pool_size": 0}
                route.db = route.db.model_copy(update=own)
                pools.update(route.pools())
        recap = False
        for pool in pools:
            if pool.db is not None:
                recap = recap or pool.db.max_db_connections != update["max_db_connections"]
                own = update if pool.key.mode is tenant.pool.mode else {**update, "min_pool_size": 0}
                pool.db = pool.db.model_copy(update=own)
                pool.settings = replace(pool.settings, **self.router.pools.live_settings(pool.db))
                if pool.waiters:
                    pool.open_for_waiters()  # a raised size serves them at once
        if recap:
            self.router.pools.recap()  # a raised cap serves waiting clients, a lowered one trims

    def pause(self, tenant_id: str) -> None:
        if tenant_id not in self.gates:
            log.info("tenant %s paused: new transactions wait", tenant_id)
            self.gates[tenant_id] = Gate(tenant_id)

    def resume(self, tenant_id: str) -> None:
        gate = self.gates.pop(tenant_id, None)
        if gate is not None:
            log.info("tenant %s resumed: releasing %d waiting transactions", tenant_id, len(gate.waiters))
            gate.open()

    async def move(self, tenant_id: str, change, *, expected_version: int | None = None) -> Tenant:
        """Blue-green for one tenant: pause it (new transactions wait), let running ones finish
        (up to tenant_drop_timeout), switch its record to the new cluster/database, resume. The
        waiting transactions, and every later one, run at the new place; clients stay connected.
        A transaction still running at the deadline fails the move (409-class error) and the
        tenant is resumed where it was."""
        assert self.store is not None
        paused = await self.store.pause(tenant_id, expected_version=expected_version)
        self.apply(paused)
        try:
            if not await self.wait_idle(tenant_id, self.settings.tenant_drop_timeout, every_worker=True):
                raise MoveTimeout(
                    f'tenant "{tenant_id}" still has transactions running after '
                    f"{self.settings.tenant_drop_timeout:g}s; not moved"
                )
            moved = await self.store.patch(tenant_id, change)
        except BaseException:
            self.apply(await self.store.resume(tenant_id))
            raise
        self.apply(moved)
        resumed = await self.store.resume(tenant_id)
        self.apply(resumed)
        log.info("tenant %s moved to %s/%s", tenant_id, self.cluster_name(resumed), resumed.database)
        return resumed

    def in_flight(self, tenant_id: str) -> int:
        return sum(1 for c in self.clients.get(tenant_id, ()) if c.server is not None)

    async def wait_idle(self, tenant_id: str, timeout: float, *, every_worker: bool = False) -> bool:
        """Wait until none of the tenant's clients is in a transaction; False on timeout.
        ``every_worker``: in the other worker processes too (router/workers/), which pause the
        tenant at once when asked."""
        deadline = time.monotonic() + timeout
        while self.in_flight(tenant_id) or (every_worker and await self._in_flight_in_siblings(tenant_id)):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _in_flight_in_siblings(self, tenant_id: str) -> int:
        worker = self.router.worker
        if worker is None:
            return 0
        from router.workers.control import pause_siblings

        return await pause_siblings(worker, tenant_id)

    async def drop(self, tenant_id: str, timeout: float) -> int:
        """A deleted tenant: let transactions finish (up to ``timeout``), then disconnect its
        clients and close its server connections. Returns the number of clients closed."""
        gate = self.gates.setdefault(tenant_id, Gate(tenant_id))  # no new transactions
        await self.wait_idle(tenant_id, timeout)
        clients = list(self.clients.pop(tenant_id, ()))
        for client in clients:
            client.fail(RouterError(SQLState.ADMIN_SHUTDOWN, f'tenant "{tenant_id}" was deleted'))
        for waiting in list(gate.waiters):
            waiting.fail(RouterError(SQLState.ADMIN_SHUTDOWN, f'tenant "{tenant_id}" was deleted'))
        self.gates.pop(tenant_id, None)
        still_used = {p for tid, pools in self.pools.items() if tid != tenant_id for p in pools}
        for pool in self.pools.pop(tenant_id, ()):
            if pool not in still_used:
                await pool.close()
                self.router.pools.drop(pool)
        if clients:
            log.info("tenant %s deleted: closed %d client connections", tenant_id, len(clients))
        return len(clients)

    def status(self, tenant_id: str) -> dict:
        """Pools, clients and nodes of a tenant on this instance (GET /tenants/{id}/status)."""
        clients = self.clients.get(tenant_id, set())
        pools = self.pools.get(tenant_id, set())
        tenant = self.cache.cached(tenant_id) if self.cache is not None else None
        nodes = []
        if tenant is not None:
            split = self.router.splits.get(self.cluster_name(tenant))
            if split is not None:
                nodes = [n.status() for n in split.topology.nodes]
        return {
            "tenant_id": tenant_id,
            "paused": tenant_id in self.gates,
            "clients": {
                "total": len(clients),
                "active": sum(1 for c in clients if c.server is not None),
                "waiting": sum(1 for c in clients if c._waiting_on is not None),
            },
            "pools": {pool.name: pool.stats() for pool in pools},
            "nodes": nodes,
        }
