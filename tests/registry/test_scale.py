"""1,000 registered tenants: the cache's memory per tenant stays flat from 100 to 1,000 cached
tenants, and every repeated lookup is a hit. Lookup time is measured and printed (run with -s)
but not asserted: timings on a shared machine are not a pass/fail signal."""

from __future__ import annotations

import gc
import time
import tracemalloc

from router.registry.cache import TenantCache
from router.registry.store import RedisStore
from tests.registry.conftest import tenant_input

TENANTS = 1000
LOOKUP_ROUNDS = 20


async def measure(store: RedisStore, tenant_ids: list[str]) -> tuple[float, float]:
    """(bytes held per cached tenant, ns per cached lookup) for a fresh cache of these ids."""
    cache = TenantCache(store)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for tenant_id in tenant_ids:
            await cache.get(tenant_id)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == len(tenant_ids) and cache.misses == len(tenant_ids)

    start = time.perf_counter_ns()
    for _ in range(LOOKUP_ROUNDS):
        for tenant_id in tenant_ids:
            await cache.get(tenant_id)
    elapsed = time.perf_counter_ns() - start
    assert cache.hits == LOOKUP_ROUNDS * len(tenant_ids)  # every repeat lookup was a hit
    assert cache.misses == len(tenant_ids)
    return held / len(tenant_ids), elapsed / (LOOKUP_ROUNDS * len(tenant_ids))


async def test_memory_per_tenant_stays_flat(store: RedisStore) -> None:
    tenant_ids = [f"tenant-{i:04d}" for i in range(TENANTS)]
    for tenant_id in tenant_ids:
        await store.create(tenant_input(tenant_id, database=f"db_{tenant_id}"))
    assert len(await store.list_ids()) == TENANTS
    await measure(store, tenant_ids[:10])  # warm up: connections, pydantic, the event loop

    figures = {}
    for count in (100, TENANTS):
        figures[count] = await measure(store, tenant_ids[:count])
        per_tenant, lookup_ns = figures[count]
        print(
            f"\n{count:>5} cached tenants: {per_tenant:,.0f} B/tenant, {lookup_ns:,.0f} ns/lookup"
        )

    ratio = figures[TENANTS][0] / figures[100][0]
    print(f"memory per tenant, 1000 vs 100: x{ratio:.2f}")
    # Generous: a per-entry cost that grew with the number of entries would show as x2 or more.
    assert 0.5 < ratio < 1.5
