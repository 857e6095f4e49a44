"""The /tenants routes: the registry's records, created, changed and deleted over HTTP.

Every write goes to Redis first (the store publishes the change, and every router instance
applies it through its cache's pub/sub), then to this instance's TenantManager at once, so the
instance that took the request does not wait for its own invalidation: a pause is in force here
when the response is sent, and a DELETE answers only once the tenant's transactions here have
finished (or ``tenant_drop_timeout`` passed) and its clients are disconnected.

Optimistic concurrency: a record's ``version`` is its ETag. PUT, PATCH, DELETE and the other
writes honour ``If-Match: <version>`` and answer 412 when the record has moved on. Without
If-Match a write applies to whatever is current.

Status codes (also in errors.py): 404 unknown tenant or user, 409 tenant exists, 412 stale
If-Match, 422 invalid body or If-Match (naming the field), 502 provisioning
failed on the tenant's primary, 503 registry unreachable or a record that cannot be decrypted.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict

from router.admin.errors import ERROR_RESPONSES, StrictJSONRoute
from router.admin.provision import provisioned
from router.admin.views import TenantCreateRequest, TenantStatusView, TenantView, json_safe
from router.registry.errors import RegistryUnavailable, TenantExists, TenantNotFound
from router.registry.models import ClusterPatch, Tenant, TenantPatch, TenantUpdate, UserCreate


class TenantMove(BaseModel):
    """Where a tenant moves: a new cluster and/or database (blue-green for one tenant)."""

    model_config = ConfigDict(extra="forbid")
    cluster: ClusterPatch | None = None
    database: str | None = None

if TYPE_CHECKING:
    from router.tenants import TenantManager


# Dependencies are ``async def`` too: FastAPI runs plain ``def`` ones in a thread pool, away from
# the router's loop and its state.
async def registry(request: Request) -> TenantManager:
    """This instance's TenantManager, once it has a store; else 503."""
    manager = request.app.state.router.tenants
    if not manager.enabled:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "tenant registry not configured: the router has no redis_url",
        )
    if manager.store is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "tenant registry not started")
    return manager


# A version as ETag gives it ("3"), bare (3) or weak (W/"3"); or "*", any version. Versions
# fit in 18 digits for as long as anyone will write to one record.
IF_MATCH_PATTERN = r'^\s*(\*|(W/)?"?[0-9]{1,18}"?)\s*$'


async def expected_version(
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            pattern=IF_MATCH_PATTERN,
            description='The version the change is based on, as ETag gives it ("3"); '
            "412 if the record has moved on.",
        ),
    ] = None,
) -> int | None:
    if if_match is None or if_match.strip() == "*":
        return None
    return int(if_match.strip().removeprefix("W/").strip('"'))


Manager = Annotated["TenantManager", Depends(registry)]
Version = Annotated[int | None, Depends(expected_version)]


Body = TypeVar("Body", TenantCreateRequest, TenantUpdate, TenantPatch)


async def _hashed(body: Body) -> Body:
    """``body`` with its client passwords replaced by their verifiers, computed in a thread:
    a SCRAM verifier is 4096 rounds of PBKDF2 (about 2 ms), and the router's clients share
    this event loop."""
    if not body.users:
        return body
    users = await asyncio.to_thread(_hash_users, body.users)
    return body.model_copy(update={"users": users})


def _hash_users(users: list[UserCreate]) -> list[UserCreate]:
    return [
        user
        if user.password is None
        else UserCreate(name=user.name, auth=user.auth, verifier=user.to_user().verifier)
        for user in users
    ]


def _answer(response: Response, tenant: Tenant) -> TenantView:
    response.headers["ETag"] = f'"{tenant.version}"'
    return TenantView.of(tenant)


def tenant_routes() -> APIRouter:
    routes = APIRouter(prefix="/tenants", tags=["tenants"], route_class=StrictJSONRoute)

    @routes.get("", responses=ERROR_RESPONSES, summary="List tenants")
    async def list_tenants(manager: Manager) -> list[TenantView]:
        return [TenantView.of(t) for t in await manager.store.list_tenants()]

    @routes.post(
        "",
        status_code=status.HTTP_201_CREATED,
        responses=ERROR_RESPONSES,
        summary="Create a tenant (and with provision, its database and role)",
    )
    async def create_tenant(
        body: TenantCreateRequest,
        request: Request,
        response: Response,
        manager: Manager,
        provision: Annotated[
            bool, Query(description="create the database on the tenant's primary first")
        ] = False,
        provision_role: Annotated[
            bool, Query(description="also create server_user with server_password")
        ] = False,
    ) -> TenantView:
        store = manager.store
        body = await _hashed(body)
        role = body.provision_role or provision_role
        if body.provision or provision or role:
            try:  # before touching PostgreSQL: a duplicate must not provision anything
                await store.get(body.tenant_id)
                raise TenantExists(body.tenant_id)
            except TenantNotFound:
                pass
            admin = request.app.state.admin
            async with provisioned(
                body, role=role, provision_dsn=admin.provision_dsn, timeout=admin.provision_timeout
            ):
                tenant = await store.create(body)
        else:
            tenant = await store.create(body)
        manager.apply(tenant)
        response.headers["Location"] = f"/tenants/{tenant.tenant_id}"
        return _answer(response, tenant)

    @routes.get("/{tenant_id}", responses=ERROR_RESPONSES, summary="One tenant")
    async def get_tenant(tenant_id: str, response: Response, manager: Manager) -> TenantView:
        return _answer(response, await manager.store.get(tenant_id))

    @routes.put("/{tenant_id}", responses=ERROR_RESPONSES, summary="Replace a tenant")
    async def replace_tenant(
        tenant_id: str, body: TenantUpdate, response: Response, manager: Manager, version: Version
    ) -> TenantView:
        body = await _hashed(body)
        tenant = await manager.store.update(tenant_id, body, expected_version=version)
        manager.apply(tenant)
        return _answer(response, tenant)

    @routes.patch("/{tenant_id}", responses=ERROR_RESPONSES, summary="Change some fields")
    async def patch_tenant(
        tenant_id: str, body: TenantPatch, response: Response, manager: Manager, version: Version
    ) -> TenantView:
        body = await _hashed(body)
        tenant = await manager.store.patch(tenant_id, body, expected_version=version)
        manager.apply(tenant)
        return _answer(response, tenant)

    @routes.delete(
        "/{tenant_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        responses=ERROR_RESPONSES,
        summary="Delete a tenant: its clients here are disconnected once idle",
    )
    async def delete_tenant(
        tenant_id: str, request: Request, manager: Manager, version: Version
    ) -> Response:
        await manager.store.delete(tenant_id, expected_version=version)
        timeout = request.app.state.router.settings.tenant_drop_timeout
        await manager.drop(tenant_id, timeout)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @routes.post(
        "/{tenant_id}/users",
        responses=ERROR_RESPONSES,
        summary="Add a client login (or replace the one of that name)",
    )
    async def add_user(
        tenant_id: str, body: UserCreate, response: Response, manager: Manager, version: Version
    ) -> TenantView:
        (body,) = await asyncio.to_thread(_hash_users, [body])
        tenant = await manager.store.add_user(tenant_id, body, expected_version=version)
        manager.apply(tenant)
        return _answer(response, tenant)

    @routes.delete("/{tenant_id}/users/{name}", responses=ERROR_RESPONSES, summary="Remove a login")
    async def remove_user(
        tenant_id: str, name: str, response: Response, manager: Manager, version: Version
    ) -> TenantView:
        tenant = await manager.store.remove_user(tenant_id, name, expected_version=version)
        manager.apply(tenant)
        return _answer(response, tenant)

    @routes.post(
        "/{tenant_id}/pause",
        responses=ERROR_RESPONSES,
        summary="Pause: new transactions wait, running ones finish",
    )
    async def pause_tenant(
        tenant_id: str, response: Response, manager: Manager, version: Version
    ) -> TenantView:
        tenant = await manager.store.pause(tenant_id, expected_version=version)
        manager.apply(tenant)
        return _answer(response, tenant)

    @routes.post(
        "/{tenant_id}/resume",
        responses=ERROR_RESPONSES,
        summary="Resume: waiting transactions go ahead",
    )
    async def resume_tenant(
        tenant_id: str, response: Response, manager: Manager, version: Version
    ) -> TenantView:
        tenant = await manager.store.resume(tenant_id, expected_version=version)
        manager.apply(tenant)
        return _answer(response, tenant)

    @routes.post(
        "/{tenant_id}/move",
        responses=ERROR_RESPONSES,
        summary="Move the tenant to another cluster and/or database: pause, drain, switch, resume",
    )
    async def move_tenant(
        tenant_id: str, body: TenantMove, response: Response, manager: Manager, version: Version
    ) -> TenantView:
        from router.tenants import MoveTimeout

        try:
            tenant = await manager.move(
                tenant_id,
                TenantPatch(**body.model_dump(exclude_unset=True)),
                expected_version=version,
            )
        except MoveTimeout as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return _answer(response, tenant)

    @routes.get(
        "/{tenant_id}/status",
        responses=ERROR_RESPONSES,
        summary="The tenant's clients, pools and nodes on this instance, and its record",
    )
    async def tenant_status(tenant_id: str, manager: Manager) -> TenantStatusView:
        stale = False
        try:
            tenant = await manager.store.get(tenant_id)
        except RegistryUnavailable:
            tenant = manager.cache.cached(tenant_id) if manager.cache is not None else None
            if tenant is None:
                raise
            stale = True
        here = manager.status(tenant_id)
        if manager.router.worker is not None:  # worker 0 of several: every worker's clients
            from router.admin.aggregate import all_workers_status

            here = await all_workers_status(manager.router.worker, here, tenant_id)
        here = json_safe(here)
        here.update(tenant=TenantView.of(tenant), record_stale=stale)
        return TenantStatusView.model_validate(here)

    return routes
