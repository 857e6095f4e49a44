"""GET /queries and GET /tenants/{id}/queries: query statistics per tenant and fingerprint
(router/stats/queries.py), largest total time first. Statement texts carry $n in place of their
constants, so parameters never leave the router. Both need the admin token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel

from router.admin.errors import ERROR_RESPONSES
from router.registry.errors import TenantNotFound

if TYPE_CHECKING:
    from router.app import Router
    from router.stats.queries import QueryStats


class QueryStatView(BaseModel):
    tenant: str  # the registry's tenant id, or the database name of a configured database
    fingerprint: str  # libpg_query's fingerprint (an "x" prefix: text the grammar rejects)
    query: str  # the first text seen, constants replaced by $1, $2, ...
    calls: int
    total_ms: float
    mean_ms: float
    max_ms: float
    rows: int
    errors: int
    roles: dict[str, int]  # calls per node role (primary, replica)


class QueryStatsView(BaseModel):
    max_entries: int  # query_stats_max: fingerprints kept, by total time
    evicted: int  # fingerprints dropped to stay within max_entries
    slow_queries: int  # calls logged as slower than slow_query_ms
    queries: list[QueryStatView]


Limit = Annotated[int, Query(ge=1, le=10_000, description="at most this many, by total time")]


def _stats(router: Router) -> QueryStats:
    stats = router.query_stats
    if stats is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "query statistics are off (query_stats_max = 0)")
    return stats


async def _view(router: Router, stats: QueryStats, limit: int, tenant: str | None = None) -> QueryStatsView:
    if router.worker is None:
        entries, evicted, slow = stats.top(limit, tenant=tenant), stats.evicted, stats.slow_queries
    else:  # worker 0 of several: every worker's statistics, merged
        from router.admin.aggregate import all_workers_queries

        entries, evicted, slow = await all_workers_queries(
            router.worker, stats.top(tenant=tenant), stats.evicted, stats.slow_queries, tenant
        )
        entries = entries[:limit]
    return QueryStatsView(
        max_entries=stats.max_entries,
        evicted=evicted,
        slow_queries=slow,
        queries=[QueryStatView(**entry.as_dict()) for entry in entries],
    )


async def _known_tenant(router: Router, tenant_id: str) -> bool:
    if tenant_id in router.settings.databases:
        return True
    manager = router.tenants
    if not manager.enabled or manager.store is None:
        return False
    try:
        await manager.store.get(tenant_id)
    except TenantNotFound:
        return False
    return True


def query_routes() -> APIRouter:
    routes = APIRouter(tags=["queries"])

    @routes.get("/queries", responses=ERROR_RESPONSES, summary="Query statistics of all tenants")
    async def all_queries(request: Request, limit: Limit = 100) -> QueryStatsView:
        router = request.app.state.router
        return await _view(router, _stats(router), limit)

    @routes.get(
        "/tenants/{tenant_id}/queries", responses=ERROR_RESPONSES, summary="Query statistics of one tenant"
    )
    async def tenant_queries(tenant_id: str, request: Request, limit: Limit = 100) -> QueryStatsView:
        router = request.app.state.router
        view = await _view(router, _stats(router), limit, tenant_id)
        if not view.queries and not await _known_tenant(router, tenant_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown tenant {tenant_id!r}")
        return view

    return routes
