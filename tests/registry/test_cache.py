"""TenantCache against a real redis-server: cache-aside with TTL, invalidation over pub/sub
reaching another cache, serving known tenants while Redis is down, and resynchronising by the
registry version when it comes back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from router.registry.cache import TenantCache
from router.registry.errors import RegistryUnavailable, TenantNotFound
from router.registry.invalidation import Invalidation
from router.registry.models import Tenant, TenantPatch
from router.registry.store import RedisStore
from tests.registry.conftest import RedisServer, eventually, tenant_input

# How soon a write through one router must show in another router's cache.
PROPAGATION = 0.1


class Clock:
    """A clock the test moves, so TTL expiry needs no waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def open_cache() -> AsyncIterator[Callable[..., TenantCache]]:
    caches: list[TenantCache] = []

    def open_(store: RedisStore, *, start: bool = True, **kwargs: object) -> TenantCache:
        cache = TenantCache(store, **kwargs)
        if start:
            cache.start()
        caches.append(cache)
        return cache

    yield open_
    for cache in caches:
        await cache.stop()


def get_calls(server: RedisServer) -> int:
    """How many GETs the server has run (its own count, no mock needed)."""
    stats = server.client().info("commandstats")
    return stats.get("cmdstat_get", {}).get("calls", 0)


async def test_cache_aside_counts_hits_and_misses(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await store.create(tenant_input("acme"))
    cache = TenantCache(store)
    first = await cache.get("acme")
    gets = get_calls(redis_server)
    second = await cache.get("acme")
    assert second is first
    assert (cache.hits, cache.misses, cache.stale_serves) == (1, 1, 0)
    assert get_calls(redis_server) == gets  # the hit did not touch Redis
    assert cache.stale is False and len(cache) == 1


async def test_ttl_expiry_reloads(store: RedisStore) -> None:
    clock = Clock()
    await store.create(tenant_input("acme"))
    cache = TenantCache(store, ttl=30, clock=clock)  # not started: no invalidations, TTL only
    assert (await cache.get("acme")).paused is False
    await store.pause("acme")
    clock.now += 29
    assert (await cache.get("acme")).paused is False  # still within its TTL
    clock.now += 2
    assert (await cache.get("acme")).paused is True
    assert cache.misses == 2


async def test_unknown_tenant_is_remembered_briefly(
    store: RedisStore, redis_server: RedisServer
) -> None:
    clock = Clock()
    cache = TenantCache(store, negative_ttl=5, clock=clock)
    with pytest.raises(TenantNotFound):
        await cache.get("ghost")
    gets = get_calls(redis_server)
    with pytest.raises(TenantNotFound):
        await cache.get("ghost")
    assert get_calls(redis_server) == gets
    await store.create(tenant_input("ghost"))
    clock.now += 6
    assert (await cache.get("ghost")).tenant_id == "ghost"


async def test_concurrent_misses_share_one_read(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await store.create(tenant_input("acme"))
    cache = TenantCache(store)
    gets = get_calls(redis_server)
    tenants = await asyncio.gather(*(cache.get("acme") for _ in range(50)))
    assert all(t is tenants[0] for t in tenants)
    assert get_calls(redis_server) == gets + 1


async def test_a_read_that_raced_a_write_is_not_cached(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """A load whose GET ran before a write, with the write's invalidation arriving before the
    GET's reply, must not cache what it read. The interleaving is forced: the test holds the
    event loop (blocking calls) between Redis running the GET and the cache seeing its reply,
    writes meanwhile, and hands the cache the invalidation the subscriber would deliver."""
    await store.create(tenant_input("acme"))
    cache = TenantCache(store, ttl=3600)
    raw = redis_server.client()
    gets = get_calls(redis_server)
    load = asyncio.ensure_future(cache.get("acme"))
    async with asyncio.timeout(5):
        while get_calls(redis_server) == gets:  # until Redis has answered the cache's GET
            await asyncio.sleep(0)
    record = json.loads(raw.get("pgrouter:tenant:acme"))
    record["tenant"].update(version=2, paused=True)
    raw.set("pgrouter:tenant:acme", json.dumps(record))
    await cache._apply(Invalidation("acme", 2, 2))  # the subscriber's step
    assert (await load).version == 2  # it read again instead of answering with version 1
    assert cache.cached("acme").paused is True


async def test_invalidation_reaches_another_cache(
    open_store: Callable[..., RedisStore], open_cache: Callable[..., TenantCache]
) -> None:
    # Two routers on one Redis: each its own store (connections) and cache.
    store_a, store_b = open_store(), open_store()
    cache_a, cache_b = open_cache(store_a), open_cache(store_b)
    await asyncio.gather(cache_a.wait_synced(5), cache_b.wait_synced(5))
    changes: list[tuple[str, Tenant | None]] = []
    cache_b.on_change.append(lambda tenant_id, tenant: changes.append((tenant_id, tenant)))

    await store_a.create(tenant_input("acme"))
    await asyncio.gather(cache_a.get("acme"), cache_b.get("acme"))
    assert changes == []  # a first load is not a change

    await store_a.patch("acme", TenantPatch(paused=True))

    async def b_sees_pause() -> bool:
        return (await cache_b.get("acme")).paused

    took = await eventually(b_sees_pause, PROPAGATION, "cache B sees the pause")
    print(f"\ninvalidation reached the other cache in {took * 1000:.1f} ms")
    assert [(tid, t.version) for tid, t in changes] == [("acme", 2)]
    assert cache_b.misses == 1  # the message reloaded it; gets were hits

    await store_a.delete("acme")

    async def b_sees_delete() -> bool:
        try:
            await cache_b.get("acme")
        except TenantNotFound:
            return True
        return False

    await eventually(b_sees_delete, PROPAGATION, "cache B sees the delete")
    assert changes[-1] == ("acme", None)


async def test_create_clears_a_remembered_unknown_tenant(
    open_store: Callable[..., RedisStore], open_cache: Callable[..., TenantCache]
) -> None:
    store_a, store_b = open_store(), open_store()
    cache_b = open_cache(store_b, negative_ttl=60)
    await cache_b.wait_synced(5)
    with pytest.raises(TenantNotFound):
        await cache_b.get("newco")
    await store_a.create(tenant_input("newco"))

    async def b_sees_it() -> bool:
        try:
            return (await cache_b.get("newco")).tenant_id == "newco"
        except TenantNotFound:
            return False

    await eventually(b_sees_it, PROPAGATION, "cache B sees the new tenant")


async def test_on_change_callback_errors_are_contained(
    store: RedisStore, open_cache: Callable[..., TenantCache], caplog: pytest.LogCaptureFixture
) -> None:
    cache = open_cache(store)
    await cache.wait_synced(5)
    seen: list[int] = []

    def broken(tenant_id: str, tenant: Tenant | None) -> None:
        raise RuntimeError("bug in a callback")

    cache.on_change += [broken, lambda tid, t: seen.append(t.version if t else 0)]
    await store.create(tenant_input("acme"))
    await cache.get("acme")
    await store.pause("acme")
    await eventually(lambda: seen == [2], PROPAGATION, "the second callback ran")
    assert "on_change callback failed" in caplog.text
    await store.resume("acme")
    await eventually(lambda: seen == [2, 3], PROPAGATION, "the subscriber kept going")


async def test_redis_down_serves_known_tenants_stale(
    open_store: Callable[..., RedisStore],
    open_cache: Callable[..., TenantCache],
    redis_server: RedisServer,
) -> None:
    clock = Clock()
    store = open_store()
    await store.create(tenant_input("acme"))
    await store.create(tenant_input("uncached"))
    cache = open_cache(store, ttl=30, clock=clock)
    await cache.wait_synced(5)
    known = await cache.get("acme")
    assert cache.stale is False

    redis_server.stop()  # SIGKILL by PID
    await eventually(lambda: cache.stale, 5, "the cache notices Redis is gone")

    clock.now += 3600  # far past the TTL
    assert await cache.get("acme") is known
    assert cache.stale_serves == 1 and cache.stale is True
    with pytest.raises(RegistryUnavailable, match='registry unavailable and tenant "uncached"'):
        await cache.get("uncached")
    with pytest.raises(RegistryUnavailable, match="tenant registry unavailable"):
        await store.create(tenant_input("newco"))
    with pytest.raises(RegistryUnavailable):
        await store.pause("acme")


async def test_failed_reload_serves_stale_without_a_subscriber(
    store: RedisStore, redis_server: RedisServer
) -> None:
    # Not started: no subscriber to report Redis gone, so the expired entry's reload is what
    # fails, and the cache falls back to the entry it has.
    clock = Clock()
    await store.create(tenant_input("acme"))
    cache = TenantCache(store, ttl=30, clock=clock)
    known = await cache.get("acme")
    redis_server.client().save()  # so that the restart below brings the record back
    redis_server.stop()
    clock.now += 31
    assert await cache.get("acme") is known
    assert (cache.stale, cache.stale_serves, cache.misses) == (True, 1, 2)
    with pytest.raises(RegistryUnavailable, match='tenant "other" is not cached'):
        await cache.get("other")
    redis_server.start()
    reloaded = await cache.get("acme")
    assert reloaded is not known and reloaded.version == known.version
    assert (cache.stale, cache.stale_serves, cache.misses) == (False, 1, 4)


async def test_redis_back_resyncs_by_registry_version(
    open_store: Callable[..., RedisStore],
    open_cache: Callable[..., TenantCache],
    redis_server: RedisServer,
) -> None:
    store = open_store()
    for tenant_id in ("changed", "same", "dropped"):
        await store.create(tenant_input(tenant_id))
    cache = open_cache(store, ttl=3600)  # no TTL expiry: only the resync can refresh
    await cache.wait_synced(5)
    for tenant_id in ("changed", "same", "dropped"):
        await cache.get(tenant_id)
    changes: list[tuple[str, int | None]] = []
    cache.on_change.append(lambda tid, t: changes.append((tid, t.version if t else None)))

    # Changes the cache cannot hear about: written behind the store's back, no PUBLISH, the
    # way a message is lost while a subscriber is disconnected. Then saved, so the restarted
    # server (same port, same directory) comes back with them.
    raw = redis_server.client()
    record = json.loads(raw.get("pgrouter:tenant:changed"))
    record["tenant"].update(version=2, paused=True)
    raw.set("pgrouter:tenant:changed", json.dumps(record))
    raw.delete("pgrouter:tenant:dropped")
    raw.srem("pgrouter:tenants", "dropped")
    raw.incrby("pgrouter:version", 2)
    raw.save()
    assert (await cache.get("changed")).paused is False  # the cache has not seen it

    redis_server.stop()
    await eventually(lambda: cache.stale, 5, "the cache notices Redis is gone")
    redis_server.start()
    await eventually(lambda: not cache.stale, 10, "the cache resynchronises")

    assert (await cache.get("changed")).paused is True
    with pytest.raises(TenantNotFound):
        await cache.get("dropped")
    assert sorted(changes, key=str) == [("changed", 2), ("dropped", None)]
    assert cache.registry_version == 5


async def test_registry_version_unchanged_means_no_reload(
    open_store: Callable[..., RedisStore],
    open_cache: Callable[..., TenantCache],
    redis_server: RedisServer,
) -> None:
    store = open_store()
    await store.create(tenant_input("acme"))
    cache = open_cache(store)
    await cache.wait_synced(5)
    await cache.get("acme")
    redis_server.client().save()
    redis_server.stop()
    await eventually(lambda: cache.stale, 5, "the cache notices Redis is gone")
    redis_server.start()  # a new process: its command counters start at zero
    await eventually(lambda: not cache.stale, 10, "the cache reconnects")
    stats = redis_server.client().info("commandstats")
    # The resync read the version counter (one GET) and, finding it unchanged, nothing else.
    assert stats.get("cmdstat_get", {}).get("calls") == 1
    assert "cmdstat_mget" not in stats
