"""What the admin API answers with: tenant records with their secrets masked, and the shapes of
the other replies, as pydantic models so that /openapi.json describes them exactly.

Nothing secret leaves through the API: ``server_password`` and each user's ``verifier`` are
replaced by ``MASK`` when set (null when not), so a caller can tell whether one is set without
learning it. A verifier is not a password, but it is what an offline guessing attack starts
from, and it is enough to impersonate the server in SCRAM.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from router.config import AuthMethod
from router.registry.models import (
    Tenant,
    TenantCluster,
    TenantCreate,
    TenantId,
    TenantLimits,
    TenantMode,
    TenantPool,
)

MASK = "********"


class UserView(BaseModel):
    name: str
    auth: AuthMethod
    verifier: str | None  # MASK when set


class TenantView(BaseModel):
    """A tenant record as the API returns it."""

    tenant_id: str
    mode: TenantMode
    cluster: TenantCluster
    database: str
    server_user: str
    server_password: str | None  # MASK when set
    auth_query: bool
    pool: TenantPool
    limits: TenantLimits
    tenant_key: UUID | None
    paused: bool
    users: list[UserView]
    created_at: datetime
    updated_at: datetime
    version: int

    @classmethod
    def of(cls, tenant: Tenant) -> TenantView:
        return cls(
            tenant_id=tenant.tenant_id,
            mode=tenant.mode,
            cluster=tenant.cluster,
            database=tenant.database,
            server_user=tenant.server_user,
            server_password=MASK if tenant.server_password is not None else None,
            auth_query=tenant.auth_query,
            pool=tenant.pool,
            limits=tenant.limits,
            tenant_key=tenant.tenant_key,
            paused=tenant.paused,
            users=[
                UserView(
                    name=user.name,
                    auth=user.auth,
                    verifier=MASK if user.verifier is not None else None,
                )
                for user in tenant.users
            ],
            created_at=tenant.created_at,
            updated_at=tenant.updated_at,
            version=tenant.version,
        )


class TenantCreateRequest(TenantCreate):
    """POST /tenants: a tenant, and whether to create its database (and role) first."""

    # The rule is the model's own validator; the pattern tells /openapi.json's readers.
    tenant_id: TenantId = Field(json_schema_extra={"pattern": r"^([a-z0-9_-]{1,63}|\*)$"})
    provision: bool = False  # create the database on the tenant's primary if it is missing
    provision_role: bool = False  # also the server_user role, with server_password


class TenantStatusView(BaseModel):
    """GET /tenants/{id}/status: this instance's view of the tenant, and its record."""

    model_config = ConfigDict(extra="allow")  # whatever else TenantManager.status reports

    tenant_id: str
    paused: bool = False  # on this instance (its gate is closed)
    clients: dict[str, int] = {}
    pools: dict[str, dict[str, int]] = {}
    nodes: list[dict[str, Any]] = []
    tenant: TenantView
    record_stale: bool = False  # the registry was unreachable: the record is the cached one


class PoolsView(BaseModel):
    """GET /pools: this instance's clients and server connection pools (every worker's)."""

    clients: dict[str, int]  # total, active (holding a server connection), waiting, pinned
    # By pool ("database/user@host:port"): size, servers, idle, active, connecting, waiting,
    # reserve_size, reserve_opened (connections opened beyond size for clients that waited);
    # for each cap it counts towards, max_db_connections / max_user_connections (the limit)
    # and max_db_connections_used / max_user_connections_used (held by all the cap's pools).
    pools: dict[str, dict[str, int]]


class DatabaseStatsView(BaseModel):
    """One database's figures (as clients name it; a registry tenant's id), as PgBouncer's
    SHOW STATS row (router/stats/traffic.py): totals since the start, averages over the
    last closed stats_period; times in µs."""

    database: str
    total_xact_count: int
    total_query_count: int
    total_received: int  # bytes of client messages forwarded to servers
    total_sent: int  # bytes of server messages forwarded to clients
    total_xact_time: int
    total_query_time: int
    total_wait_time: int
    avg_xact_count: int  # per second
    avg_query_count: int
    avg_recv: int
    avg_sent: int
    avg_xact_time: int  # per transaction
    avg_query_time: int  # per query
    avg_wait_time: int  # waited per second of the period


class StatsView(BaseModel):
    """GET /stats: every database's figures, every worker's added up."""

    stats_period: int
    workers_reporting: int  # workers whose figures are included (the others did not answer)
    databases: list[DatabaseStatsView]


class DatabasePauseView(BaseModel):
    """POST /databases/{name}/pause and /resume."""

    database: str
    paused: bool
    still_in_flight: int  # clients still holding a server connection when the pause answered


class DatabaseCommandView(BaseModel):
    """POST /databases/{name}/kill, /disable, /enable, /reconnect, /wait_close: the console's
    commands of those names, in every worker."""

    database: str
    command: str
    # kill: clients disconnected; reconnect: server connections to close; wait_close: those
    # still open when it answered (after tenant_drop_timeout); disable, enable: 0.
    count: int


class ClientView(BaseModel):
    """A logged-in client, as SHOW CLIENTS lists it."""

    worker: int  # the worker process holding it (0 without workers)
    id: int  # the process id it was given at login (its driver's backend pid): /clients/{id}/kill
    user: str
    database: str
    tenant: str | None
    address: str
    state: str  # active (holding a server connection), waiting (for one), idle
    tls: bool
    pinned: list[str]  # what keeps it on its server connection (LISTEN, advisory lock, ...)
    connected_seconds: int | None


class ClientsView(BaseModel):
    """GET /clients: every worker's clients; workers_reporting says how many answered."""

    workers_reporting: int
    clients: list[ClientView]


class ClientKillView(BaseModel):
    """POST /clients/{client_id}/kill: the console's KILL_CLIENT, on whichever worker holds
    the client."""

    client_id: int
    killed: bool


class TopologyView(BaseModel):
    """GET /topology: every node of the clusters with replicas, as the lag monitor last saw it."""

    nodes: list[dict[str, Any]]


class ErrorView(BaseModel):
    detail: str


class HealthView(BaseModel):
    status: str


class ReadinessView(BaseModel):
    ready: bool
    listener: str
    registry: str


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("inf"): JSON has no infinity, and a
    replica whose lag is unknown reports lag_seconds = inf."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value
