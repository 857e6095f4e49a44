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


def _view(stats: QueryStats, entries) -> QueryStatsView:
    return QueryStatsView(
        max_entries=stats.max_entries,
        evicted=stats.evicted,
        slow_queries=stats.slow_queries,
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
        stats = _stats(request.app.state.router)
        return _view(stats, stats.top(limit))

    @routes.get(
        "/tenants/{tenant_id}/queries", responses=ERROR_RESPONSES, summary="Query statistics of one tenant"
    )
    async def tenant_queries(tenant_id: str, request: Request, limit: Limit = 100) -> QueryStatsView:
        router = request.app.state.router
        stats = _stats(router)
        entries = stats.top(limit, tenant=tenant_id)
        if not entries and not await _known_tenant(router, tenant_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown tenant {tenant_id!r}")
        return _view(stats, entries)

    return routes
