"""The in-process tenant cache in front of RedisStore: every client login looks its tenant up
here, so a cached lookup is one dict lookup and one clock comparison.

Freshness comes from two sources. Normally the invalidation channel: each write publishes the
tenant id, and the subscriber task reloads that entry at once, so a change reaches every router
within a round trip. The TTL (30 s by default) is the safety net behind it. Pub/sub drops what is
published while a subscriber is disconnected, so after every (re)connection the subscriber
compares the registry version with the last one it saw and, if they differ, reloads every
cached entry.

When Redis is down the cache keeps serving the tenants it knows, past their TTL, and says so
(``stale``): refusing every login because the registry blinked would turn a Redis restart into
an outage of every tenant. Tenants it does not know fail with RegistryUnavailable; unknown is
not the same as nonexistent. Records that fail to decrypt are never served (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterable

from router.registry.errors import RegistryError, RegistryUnavailable, TenantNotFound
from router.registry.invalidation import Invalidation, follow
from router.registry.models import Tenant
from router.registry.store import RedisStore
from router.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_TTL = 30.0
# Unknown names are remembered briefly so that clients retrying a wrong database name do not
# each cost a Redis round trip; a create's invalidation clears the entry at once anyway.
DEFAULT_NEGATIVE_TTL = 5.0
# Bound on remembered unknown names: they come from clients, so a scan of random names must
# not grow memory without limit. Past it the whole negative cache is dropped.
MAX_NEGATIVE_ENTRIES = 10_000
# Reads of one tenant before giving up caching it, when writes keep racing them.
FILL_ATTEMPTS = 3

OnChange = Callable[[str, Tenant | None], None]


class _Entry:
    __slots__ = ("tenant", "expires")

    def __init__(self, tenant: Tenant, expires: float) -> None:
        self.tenant = tenant
        self.expires = expires


class TenantCache:
    """Cache-aside over a RedisStore, kept fresh by a subscriber task (``start()`` once in the
    event loop that will call ``get``, then ``stop()``). The store stays the caller's to close.

    ``on_change`` callbacks run as ``callback(tenant_id, tenant)`` when a cached tenant changes
    version or is deleted (``tenant`` None); first loads do not call them. They must not block;
    their exceptions are logged.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        ttl: float = DEFAULT_TTL,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        on_change: Iterable[OnChange] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or negative_ttl < 0:
            raise ValueError("ttl must be > 0 and negative_ttl >= 0")
        self._store = store
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self.on_change: list[OnChange] = list(on_change)
        self._entries: dict[str, _Entry] = {}
        self._missing: dict[str, float] = {}  # unknown tenant id -> expiry
        # In-flight store reads by tenant id, and what invalidations said about those tenants
        # while the read was on its way: (deleted?, highest version). A read that may predate
        # such a write is done again rather than cached (see _fill).
        self._loading: dict[str, asyncio.Task[Tenant]] = {}
        self._raced: dict[str, tuple[bool, int]] = {}
        self._registry_version: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._fetch_failed = False
        self.hits = 0
        self.misses = 0
        self.stale_serves = 0

    # -- lookups --------------------------------------------------------------------------

    async def get(self, tenant_id: str) -> Tenant:
        """The tenant's record. Raises TenantNotFound, RegistryUnavailable (Redis down and the
        tenant not cached), RegistryDecryptError."""
        entry = self._entries.get(tenant_id)
        if entry is not None and entry.expires > self._clock():
            self.hits += 1
            return entry.tenant
        return await self._get_slow(tenant_id, entry)

    def cached(self, tenant_id: str) -> Tenant | None:
        """The cached record, however old, without touching Redis or the counters."""
        entry = self._entries.get(tenant_id)
        return entry.tenant if entry is not None else None

    @property
    def stale(self) -> bool:
        """True while the cache cannot vouch for its entries: the last read from Redis failed,
        or the subscriber (once started) is not connected and synchronised."""
        return self._fetch_failed or (self._task is not None and not self._synced.is_set())

    @property
    def registry_version(self) -> int | None:
        """The last registry version seen (None before the first)."""
        return self._registry_version

    def __len__(self) -> int:
        return len(self._entries)

    async def _get_slow(self, tenant_id: str, entry: _Entry | None) -> Tenant:
        now = self._clock()
        if entry is None and self._missing.get(tenant_id, 0.0) > now:
            self.hits += 1
            raise TenantNotFound(tenant_id)
        if entry is not None and self._task is not None and not self._synced.is_set():
            # Redis is known to be away and the subscriber will tell when it is back; a round
            # trip now would only fail, slowly if the network is what failed.
            return self._serve_stale(entry)
        self.misses += 1
        try:
            return await self._load(tenant_id)
        except RegistryUnavailable as exc:
            if entry is None:
                raise RegistryUnavailable(
                    f'tenant registry unavailable and tenant "{tenant_id}" is not cached: {exc}'
                ) from exc
            return self._serve_stale(entry)

    def _serve_stale(self, entry: _Entry) -> Tenant:
        self.stale_serves += 1
        return entry.tenant

    def _load(self, tenant_id: str) -> asyncio.Future[Tenant]:
        """One store read per tenant at a time, however many clients wait for it."""
        task = self._loading.get(tenant_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fill(tenant_id))
            self._loading[tenant_id] = task
            task.add_done_callback(lambda done: self._loaded(tenant_id, done))
        # A waiter that is cancelled (client gone) must not cancel the others' read.
        return asyncio.shield(task)

    def _loaded(self, tenant_id: str, task: asyncio.Task[Tenant]) -> None:
        if self._loading.get(tenant_id) is task:
            del self._loading[tenant_id]
            self._raced.pop(tenant_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have gone

    async def _fill(self, tenant_id: str) -> Tenant:
        tenant: Tenant | None = None
        for _ in range(FILL_ATTEMPTS):
            try:
                tenant = await self._store.get(tenant_id)
            except RegistryUnavailable:
                self._fetch_failed = True
                raise
            except TenantNotFound:
                tenant = None
            self._fetch_failed = False
            if self._outdated(tenant_id, tenant):
                continue
            if tenant is None:
                self._remember_missing(tenant_id)
                self._install(tenant_id, None)
                raise TenantNotFound(tenant_id)
            self._install(tenant_id, tenant)
            return tenant
        # Written again during every read: answer with the last one, cache nothing.
        if tenant is None:
            raise TenantNotFound(tenant_id)
        return tenant

    def _outdated(self, tenant_id: str, tenant: Tenant | None) -> bool:
        """Whether an invalidation that arrived during the read may postdate what it read."""
        raced = self._raced.pop(tenant_id, None)
        if raced is None:
            return False
        deleted, version = raced
        if tenant is None:
            return version > 0  # created (again) while we read that it was missing
        return deleted or version > tenant.version

    # -- changes --------------------------------------------------------------------------

    def _install(self, tenant_id: str, tenant: Tenant | None) -> None:
        """Put (or drop, for None) one entry, and tell on_change if a known tenant changed."""
        old = self._entries.get(tenant_id)
        if tenant is None:
            self._entries.pop(tenant_id, None)
        else:
            self._missing.pop(tenant_id, None)
            self._entries[tenant_id] = _Entry(tenant, self._clock() + self._ttl)
        if old is not None and (tenant is None or _differs(old.tenant, tenant)):
            for callback in self.on_change:
                try:
                    callback(tenant_id, tenant)
                except Exception:  # a callback's bug must not stop invalidations; it is logged
                    log.exception("tenant cache on_change callback failed for %s", tenant_id)

    def _remember_missing(self, tenant_id: str) -> None:
        if self._negative_ttl == 0:
            return
        if len(self._missing) >= MAX_NEGATIVE_ENTRIES:
            self._missing.clear()
        self._missing[tenant_id] = self._clock() + self._negative_ttl

    async def _apply(self, message: Invalidation) -> None:
        if message.tenant_id in self._loading:
            deleted, version = self._raced.get(message.tenant_id, (False, 0))
            self._raced[message.tenant_id] = (
                deleted or message.deleted,
                max(version, message.version or 0),
            )
        if self._registry_version is None or message.registry_version > self._registry_version:
            self._registry_version = message.registry_version
        self._missing.pop(message.tenant_id, None)
        entry = self._entries.get(message.tenant_id)
        if entry is None:
            return  # not cached here: the next get reads the store anyway
        if message.deleted:
            self._install(message.tenant_id, None)
        elif message.version is None or entry.tenant.version < message.version:
            await self._refresh(message.tenant_id)

    async def _refresh(self, tenant_id: str) -> None:
        try:
            self._install(tenant_id, await self._store.get(tenant_id))
        except RegistryUnavailable:
            raise  # the subscriber reconnects, then resynchronises everything
        except TenantNotFound:
            self._install(tenant_id, None)
        except RegistryError as exc:  # undecryptable or corrupt: never serve it (fail closed)
            log.error("%s; dropped from the tenant cache", exc)
            self._install(tenant_id, None)

    async def _resync(self) -> None:
        """Reload every cached entry if the registry changed since we last looked."""
        version = await self._store.registry_version()
        if version == self._registry_version:
            return
        for tenant_id in self._loading:  # anything may have changed: read them again
            self._raced[tenant_id] = (True, sys.maxsize)
        self._missing.clear()
        tenant_ids = list(self._entries)
        try:
            found = await self._store.get_many(tenant_ids)
        except RegistryUnavailable:
            raise
        except RegistryError:  # one record is unreadable: reload one by one, dropping it
            for tenant_id in tenant_ids:
                await self._refresh(tenant_id)
        else:
            for tenant_id, tenant in found.items():
                self._install(tenant_id, tenant)
        log.info(
            "tenant cache resynchronised: registry version %s -> %d, %d entries reloaded",
            self._registry_version,
            version,
            len(tenant_ids),
        )
        self._registry_version = version

    # -- the subscriber -------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("TenantCache already started")
        self._synced.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tenant-cache")
        self._task.add_done_callback(_log_if_failed)

    async def stop(self) -> None:
        """Stop following invalidations. Re-raises what killed the subscriber, if anything."""
        task, self._task = self._task, None
        try:
            await cancel_and_wait(task)
        finally:
            self._synced.clear()

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait until the subscriber is connected and has resynchronised (e.g. at start-up)."""
        if self._task is None:
            raise RuntimeError("TenantCache not started")
        async with asyncio.timeout(timeout):
            await self._synced.wait()

    async def _run(self) -> None:
        try:
            await self._follow()
        finally:
            self._synced.clear()  # however it ends, nobody vouches for the entries any more

    async def _follow(self) -> None:
        await follow(self._store.subscribe, self._connected, self._apply, self._lost)

    async def _connected(self) -> None:
        await self._resync()
        self._synced.set()
        self._fetch_failed = False
        log.info("tenant cache following %s", self._store.channel)

    def _lost(self, exc: Exception) -> None:
        if self._synced.is_set():
            log.warning("tenant cache lost the registry, serving cached tenants: %s", exc)
        self._synced.clear()


def _differs(old: Tenant, new: Tenant) -> bool:
    # created_at tells a tenant deleted and created again (its version restarts at 1).
    return old.version != new.version or old.created_at != new.created_at


def _log_if_failed(task: asyncio.Task[None]) -> None:
    # Logged the moment it happens; stop() re-raises it to whoever stops the cache.
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("tenant cache subscriber stopped by an error", exc_info=exc)
