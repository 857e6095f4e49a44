"""The admin HTTP API as a FastAPI application over one router (server.py runs it in the
router's event loop; every handler is ``async def`` so it runs there too and reads the router's
state without locks, never from a thread pool).

Open: ``/healthz`` (the process answers), ``/readyz`` (clients can be served: the listener is up
and the tenant registry is reachable, or its cache holds tenants to serve while it is not),
``/openapi.json``, and ``/metrics`` unless ``metrics_public`` is false. Everything under
``/tenants`` needs ``Authorization: Bearer <admin_token>``; a router without an admin_token
refuses those requests (403) rather than serving them unauthenticated.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Response, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from router.admin.api import tenant_routes
from router.admin.errors import install_error_handlers
from router.admin.metrics import (
    DEFAULT_MAX_POOL_LABELS,
    DEFAULT_MAX_TENANT_LABELS,
    metrics_registry,
)
from router.admin.provision import DEFAULT_TIMEOUT
from router.admin.queries import query_routes
from router.admin.views import (
    ClientKillView,
    ClientsView,
    ClientView,
    DatabaseCommandView,
    DatabasePauseView,
    DatabaseStatsView,
    ErrorView,
    HealthView,
    PoolsView,
    ReadinessView,
    StatsView,
    TopologyView,
    json_safe,
)

if TYPE_CHECKING:
    from router.app import Router

_bearer = HTTPBearer(auto_error=False, description="the router's admin_token setting")


@dataclass(frozen=True, slots=True)
class AdminOptions:
    """What the API needs beyond the router's settings (see create_app)."""

    provision_dsn: str | None
    provision_timeout: float


def create_app(
    router: Router,
    *,
    provision_dsn: str | None = None,
    provision_timeout: float = DEFAULT_TIMEOUT,
    max_tenant_labels: int = DEFAULT_MAX_TENANT_LABELS,
    max_pool_labels: int = DEFAULT_MAX_POOL_LABELS,
) -> FastAPI:
    """The admin API of ``router``.

    ``provision_dsn``: the login that creates tenants' databases and roles when the tenant's
    own server_user may not (provision.py); ``max_tenant_labels`` / ``max_pool_labels``: how
    many tenants and pools /metrics names before folding the rest into ``other``.
    """
    settings = router.settings
    app = FastAPI(
        title="pgrouter admin API",
        version="1",
        docs_url=None,  # the interactive pages load scripts from a CDN; the JSON is enough
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.router = router
    app.state.admin = AdminOptions(provision_dsn, provision_timeout)
    install_error_handlers(app)
    require_token = _token_check(settings.admin_token)
    auth_errors = {
        401: {"model": ErrorView, "description": "missing or wrong bearer token"},
        403: {"model": ErrorView, "description": "the router has no admin_token"},
    }
    app.include_router(tenant_routes(), dependencies=[Depends(require_token)])
    app.include_router(query_routes(), dependencies=[Depends(require_token)])

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz() -> HealthView:
        return HealthView(status="ok")

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Clients can be served",
        responses={503: {"model": ReadinessView, "description": "not ready, and why"}},
    )
    async def readyz(response: Response) -> ReadinessView:
        readiness = _readiness(router)
        if not readiness.ready:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return readiness

    registry = metrics_registry(
        router, max_tenant_labels=max_tenant_labels, max_pool_labels=max_pool_labels
    )

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
        | ({} if settings.metrics_public else auth_errors),
        dependencies=[] if settings.metrics_public else [Depends(require_token)],
    )
    async def metrics() -> Response:
        text = generate_latest(registry)
        if router.worker is not None:  # worker 0 of several: every worker's, merged
            from router.admin.aggregate import all_workers_metrics

            text = await all_workers_metrics(router.worker, text)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def router_status() -> dict:
        own = router.status()
        if router.worker is None:
            return own
        from router.admin.aggregate import all_workers_status

        return await all_workers_status(router.worker, own, "")  # every worker's clients and pools

    @app.get(
        "/pools",
        tags=["operations"],
        summary="Clients and server connection pools (PgBouncer's SHOW POOLS)",
        responses=auth_errors,
        dependencies=[Depends(require_token)],
    )
    async def pools() -> PoolsView:
        here = await router_status()
        return PoolsView(clients=here["clients"], pools=here["pools"])

    @app.get(
        "/stats",
        tags=["operations"],
        summary="Transactions, queries, bytes and waits per database (PgBouncer's SHOW STATS)",
        responses=auth_errors,
        dependencies=[Depends(require_token)],
    )
    async def stats() -> StatsView:
        from router.admin.console import (
            AVERAGE_COLUMNS,
            TOTAL_COLUMNS,
            every_worker,
            merged_traffic,
        )

        everyone = await every_worker(router, "TRAFFIC")
        databases = [
            DatabaseStatsView(
                database=row.database,
                **dict(zip(TOTAL_COLUMNS + AVERAGE_COLUMNS, row.total_columns() + row.average_columns(), strict=True)),
            )
            for row in merged_traffic(everyone)
        ]
        reporting = sum(rows is not None for rows in everyone.values())
        return StatsView(stats_period=router.settings.stats_period, workers_reporting=reporting, databases=databases)

    @app.get(
        "/topology",
        tags=["operations"],
        summary="The nodes of clusters with replicas: role, health, lag, reads in flight",
        responses=auth_errors,
        dependencies=[Depends(require_token)],
    )
    async def topology() -> TopologyView:
        here = await router_status()
        return TopologyView(nodes=json_safe(here["nodes"]))

    @app.post(
        "/databases/{name}/pause",
        tags=["operations"],
        summary="Pause a database of the settings file (the console's PAUSE): its next transactions wait",
        responses={**auth_errors, 404: {"model": ErrorView}},
        dependencies=[Depends(require_token)],
    )
    async def pause_database(name: str) -> DatabasePauseView:
        # Answers once no client of the database holds a server connection (every worker),
        # or after tenant_drop_timeout with how many still do.
        if not name or not router.known_database(name):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f'no database "{name}" in the settings file')
        busy = await router.pause_database_everywhere(name)
        return DatabasePauseView(database=name, paused=True, still_in_flight=busy)

    @app.post(
        "/databases/{name}/resume",
        tags=["operations"],
        summary="Resume a paused database: its waiting transactions go on",
        responses={**auth_errors, 404: {"model": ErrorView}},
        dependencies=[Depends(require_token)],
    )
    async def resume_database(name: str) -> DatabasePauseView:
        if not name or not router.known_database(name):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f'no database "{name}" in the settings file')
        await router.resume_database_everywhere(name)
        return DatabasePauseView(database=name, paused=False, still_in_flight=0)

    @app.post(
        "/databases/{name}/{command}",
        tags=["operations"],
        summary="The console's KILL, DISABLE, ENABLE, RECONNECT or WAIT_CLOSE of a database of the settings file",
        responses={**auth_errors, 404: {"model": ErrorView}},
        dependencies=[Depends(require_token)],
    )
    async def database_command(
        name: str, command: Literal["kill", "disable", "enable", "reconnect", "wait_close"]
    ) -> DatabaseCommandView:
        if not name or not router.known_database(name):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f'no database "{name}" in the settings file')
        verb = command.upper()
        if verb == "WAIT_CLOSE":
            count = await router.wait_close_everywhere(name)
        else:
            count = await router.database_command_everywhere(verb, name)
        return DatabaseCommandView(database=name, command=command, count=count)

    @app.get(
        "/clients",
        tags=["operations"],
        summary="Logged-in clients, over every worker (PgBouncer's SHOW CLIENTS)",
        responses=auth_errors,
        dependencies=[Depends(require_token)],
    )
    async def clients() -> ClientsView:
        from router.admin.console import every_worker, worker_rows

        columns, _ = worker_rows(router, "SHOW CLIENTS")
        everyone = await every_worker(router, "SHOW CLIENTS")
        listed = []
        for index, rows in everyone.items():
            for row in rows or ():
                c = dict(zip(columns, row, strict=True))
                since = c["connected_seconds"]
                listed.append(
                    ClientView(
                        worker=index, id=c["id"], user=c["user"], database=c["database"], tenant=c["tenant"],
                        address=c["address"], state=c["state"], tls=c["tls"] == "on",
                        pinned=c["pinned"].split(", ") if c["pinned"] else [],
                        connected_seconds=None if since is None else int(since),
                    )
                )  # fmt: skip
        reporting = sum(rows is not None for rows in everyone.values())
        return ClientsView(workers_reporting=reporting, clients=listed)

    @app.post(
        "/clients/{client_id}/kill",
        tags=["operations"],
        summary="The console's KILL_CLIENT: disconnect one client (57P01), cancelling its running query",
        responses={**auth_errors, 404: {"model": ErrorView}},
        dependencies=[Depends(require_token)],
    )
    async def kill_client(client_id: Annotated[int, Path(ge=1, le=2**31 - 1)]) -> ClientKillView:
        # The id is SHOW CLIENTS' id: the process id the client was given at login, which
        # its driver reports as the backend's.
        if not await router.database_command_everywhere("KILL_CLIENT", str(client_id)):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no client with id {client_id}")
        return ClientKillView(client_id=client_id, killed=True)

    @app.post(
        "/reload",
        tags=["operations"],
        summary="Re-read the configuration file and apply what can change while running",
        responses=auth_errors,
        dependencies=[Depends(require_token)],
    )
    async def reload() -> dict[str, list[str]]:
        # As SIGHUP: what was applied, and what needs a restart. A bad file changes nothing.
        from router.config import load_settings

        try:
            settings = load_settings(router.config_path)
        except (OSError, ValueError) as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"configuration not reloaded: {exc}") from exc
        result = router.reload(settings)
        if router.worker is not None:  # the other workers re-read the file too
            from router.workers.control import reload_siblings

            failed = [a["error"] for a in (await reload_siblings(router.worker)).values() if "error" in a]
            if failed:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "; ".join(failed))
        return result

    return app


def _token_check(token: SecretStr | None):
    expected = token.get_secret_value().encode() if token is not None else None

    async def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> None:
        if expected is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "the router has no admin_token configured: tenant endpoints are disabled",
            )
        if credentials is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing bearer token (Authorization: Bearer <admin_token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "wrong bearer token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    return require_token


def _readiness(router: Router) -> ReadinessView:
    server = router._server
    if router.draining:
        listener = "draining: shutting down"
    elif router.port is not None and server is not None and server.is_serving():
        listener = f"listening on {router.settings.listen_host}:{router.port}"
    else:
        listener = "not listening"
    listening = listener.startswith("listening")
    manager = router.tenants
    cache = manager.cache
    registry_ok = True
    if cache is None:
        registry = "no tenant registry configured"
        if manager.enabled:
            registry, registry_ok = "tenant registry not started", False
    elif not cache.stale:
        registry = f"tenant registry connected (registry version {cache.registry_version})"
    elif len(cache):
        registry = f"tenant registry unreachable; serving {len(cache)} cached tenants"
    else:
        registry, registry_ok = "tenant registry unreachable and no tenant cached", False
    return ReadinessView(ready=listening and registry_ok, listener=listener, registry=registry)
