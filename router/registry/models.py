"""Tenant records, and the shapes the admin API accepts to create and change them.

``Tenant`` is what the registry stores and the router reads: where a tenant's transactions go
(its cluster and database), as whom the router logs in there, who may log in as a client, and
its limits. It never holds a client's plaintext password: client logins are stored the way
PostgreSQL stores them (a SCRAM-SHA-256 verifier, or md5 hash), so a leaked record does not leak
passwords. The backend ``server_password`` has to be usable, so it is plaintext here, in memory
only; the store seals it before it reaches Redis (see crypto.py).

The input models (``TenantCreate``, ``TenantUpdate``, ``TenantPatch``, ``UserCreate``) take
plaintext client passwords and turn them into verifiers once, when the record is built. All of
them refuse unknown fields, so a typo in an API call is an error naming the field rather than a
setting silently ignored.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    StringConstraints,
    model_validator,
)

from router.config import (
    AuthMethod,
    NodeAddress,
    PoolMode,
    ReadYourWrites,
    ReplicaAffinity,
    ReplicaFallback,
    ServerTLS,
    address_allowed,
)
from router.protocol.auth import is_scram_verifier, md5_hash, scram_verifier

# The tenant clients reach when their database name matches no tenant id.
FALLBACK_TENANT_ID = "*"
_TENANT_ID = re.compile(r"[a-z0-9_-]{1,63}")
_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")


def _check_tenant_id(value: str) -> str:
    if value != FALLBACK_TENANT_ID and not _TENANT_ID.fullmatch(value):
        raise ValueError(
            'tenant_id must be 1-63 characters of a-z, 0-9, "_" and "-", '
            'or "*" for the fallback tenant'
        )
    return value


TenantId = Annotated[str, AfterValidator(_check_tenant_id)]
# PostgreSQL truncates identifiers to NAMEDATALEN - 1 = 63 bytes; refuse rather than truncate.
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=63)]


class TenantMode(StrEnum):
    DATABASE = "database"  # the tenant has a database of its own
    SHARED = "shared"  # the tenant's rows live beside others', told apart by tenant_key (RLS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCluster(_Strict):
    """The PostgreSQL servers of a tenant, and how the router's connections to them use TLS."""

    primary: NodeAddress
    replicas: list[NodeAddress] = []
    tls: ServerTLS = ServerTLS.DISABLE
    tls_ca: str | None = None  # path of a PEM CA bundle on the router's host

    @model_validator(mode="after")
    def _check_tls(self) -> TenantCluster:
        if self.tls is ServerTLS.VERIFY_FULL and not self.tls_ca:
            raise ValueError("cluster.tls = verify-full needs cluster.tls_ca")
        return self


class TenantPool(_Strict):
    size: int = Field(20, ge=1)
    min_size: int = Field(0, ge=0)
    mode: PoolMode = PoolMode.TRANSACTION
    # Connections beyond size for a client that waited reserve_pool_timeout, as PgBouncer's
    # reserve_pool; None: the global reserve_pool_size.
    reserve_size: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check_sizes(self) -> TenantPool:
        if self.min_size > self.size:
            raise ValueError("pool.min_size must not exceed pool.size")
        return self


class TenantLimits(_Strict):
    max_client_conn: int = Field(1000, ge=1)
    query_wait_timeout: float = Field(120.0, gt=0)  # seconds a transaction may wait for a server
    max_replica_lag: float = Field(1.0, ge=0)  # seconds; a replica further behind is skipped
    max_replica_lag_bytes: int | None = Field(None, ge=0)
    # As the [clusters] settings of these names, for this tenant's reads: with no replica
    # within bounds, read on the primary or fail; a random least-busy replica for each read,
    # or the client's last one while it is among the least busy.
    replica_fallback: ReplicaFallback = ReplicaFallback.PRIMARY
    replica_affinity: ReplicaAffinity = ReplicaAffinity.TRANSACTION
    # Whose writes the tenant's reads wait for (the global read_your_writes when None).
    read_your_writes: ReadYourWrites | None = None
    statements_per_second: float | None = Field(None, gt=0)  # None: no rate limit
    # Server connections the tenant's pools (of every server user and pool mode) may hold
    # together on one node, as PgBouncer's max_db_connections; None: the global setting.
    max_db_connections: int | None = Field(None, ge=1)
    # Client addresses the tenant's logins may come from ("10.0.0.0/8", "2001:db8::/32");
    # empty: any. Checked after authentication, so only a valid login learns of the refusal.
    allowed_cidrs: list[IPvAnyNetwork] = []

    def allows(self, address: str | None) -> bool:
        return address_allowed(self.allowed_cidrs, address)


class TenantUser(_Strict):
    """A client login as stored: the verifier, never the password."""

    name: Identifier
    auth: AuthMethod = AuthMethod.SCRAM
    verifier: str | None = None  # SCRAM-SHA-256 verifier, or 'md5' + md5(password + name)

    @model_validator(mode="after")
    def _check_verifier(self) -> TenantUser:
        _check_stored_secret(self.auth, self.verifier)
        return self


class UserCreate(_Strict):
    """A client login as the API takes it: a plaintext ``password`` (hashed on arrival), or a
    ready ``verifier`` (e.g. copied from pg_authid); neither for trust."""

    name: Identifier
    auth: AuthMethod = AuthMethod.SCRAM
    password: SecretStr | None = None
    verifier: str | None = None

    @model_validator(mode="after")
    def _check_secret(self) -> UserCreate:
        if self.auth is AuthMethod.TRUST:
            if self.password is not None or self.verifier is not None:
                raise ValueError("trust users take neither password nor verifier")
        elif (self.password is None) == (self.verifier is None):
            raise ValueError(f"{self.auth} users need exactly one of password and verifier")
        elif self.verifier is not None:
            _check_stored_secret(self.auth, self.verifier)
        elif not self.password.get_secret_value():
            raise ValueError("password must not be empty")
        return self

    def to_user(self) -> TenantUser:
        verifier = self.verifier
        if self.password is not None:
            plaintext = self.password.get_secret_value()
            if self.auth is AuthMethod.SCRAM:
                verifier = scram_verifier(plaintext)
            else:
                verifier = md5_hash(self.name, plaintext)
        return TenantUser(name=self.name, auth=self.auth, verifier=verifier)


def _check_stored_secret(auth: AuthMethod, verifier: str | None) -> None:
    if auth is AuthMethod.SCRAM and not (verifier and is_scram_verifier(verifier)):
        raise ValueError("scram-sha-256 users need verifier holding a SCRAM-SHA-256 verifier")
    if auth is AuthMethod.MD5 and not (verifier and _MD5_HASH.fullmatch(verifier)):
        raise ValueError("md5 users need verifier holding 'md5' + md5(password + user name)")
    if auth is AuthMethod.TRUST and verifier is not None:
        raise ValueError("trust users have no verifier")


class _TenantBody(_Strict):
    """The fields a tenant's owner sets; shared by the record and the create/replace inputs."""

    mode: TenantMode = TenantMode.DATABASE
    cluster: TenantCluster
    database: Identifier  # the real database name on the cluster
    server_user: Identifier
    server_password: SecretStr | None = None  # plaintext, in memory only
    auth_query: bool = False  # client logins come from pg_authid instead of `users`
    pool: TenantPool = TenantPool()
    limits: TenantLimits = TenantLimits()
    tenant_key: UUID | None = None  # the value of app.current_tenant in shared mode
    paused: bool = False

    @model_validator(mode="after")
    def _check_tenant(self) -> _TenantBody:
        if self.mode is TenantMode.SHARED and self.tenant_key is None:
            raise ValueError("tenant_key is required when mode is shared")
        users = self.users  # type: ignore[attr-defined]  # each subclass declares its own
        if self.auth_query and users:
            raise ValueError(
                "users must be empty when auth_query is true (logins come from pg_authid)"
            )
        names = [user.name for user in users]
        if len(names) != len(set(names)):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"users holds duplicate names: {', '.join(duplicates)}")
        return self


class Tenant(_TenantBody):
    """A tenant record. Immutable: a change is a new record with ``version`` + 1."""

    model_config = ConfigDict(frozen=True)

    tenant_id: TenantId
    users: tuple[TenantUser, ...] = ()
    created_at: datetime
    updated_at: datetime
    version: int = Field(ge=1)

    def user(self, name: str) -> TenantUser | None:
        for user in self.users:
            if user.name == name:
                return user
        return None


class TenantUpdate(_TenantBody):
    """PUT: the whole record but its identity and history, replaced at once."""

    users: list[UserCreate] = []

    def apply(self, current: Tenant, now: datetime) -> Tenant:
        return _build(
            self,
            tenant_id=current.tenant_id,
            created_at=current.created_at,
            updated_at=now,
            version=current.version + 1,
        )


class TenantCreate(TenantUpdate):
    tenant_id: TenantId

    def to_tenant(self, now: datetime) -> Tenant:
        return _build(self, tenant_id=self.tenant_id, created_at=now, updated_at=now, version=1)


def _build(body: TenantUpdate, **identity: Any) -> Tenant:
    data = {name: getattr(body, name) for name in _TenantBody.model_fields}
    return Tenant(**data, users=tuple(user.to_user() for user in body.users), **identity)


# -- PATCH ---------------------------------------------------------------------------------


class _Patch(_Strict):
    """Absent fields stay as they are; ``null`` clears a field only where null is a value."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _check_nulls(self) -> _Patch:
        for name in sorted(self.model_fields_set):
            if getattr(self, name) is None and name not in self.nullable:
                raise ValueError(f"{name} cannot be null")
        return self


class ClusterPatch(_Patch):
    nullable = frozenset({"tls_ca"})

    primary: NodeAddress | None = None
    replicas: list[NodeAddress] | None = None
    tls: ServerTLS | None = None
    tls_ca: str | None = None


class PoolPatch(_Patch):
    nullable = frozenset({"reserve_size"})

    size: int | None = Field(None, ge=1)
    min_size: int | None = Field(None, ge=0)
    mode: PoolMode | None = None
    reserve_size: int | None = Field(None, ge=0)


class LimitsPatch(_Patch):
    nullable = frozenset({"max_replica_lag_bytes", "read_your_writes", "statements_per_second", "max_db_connections"})

    max_client_conn: int | None = Field(None, ge=1)
    query_wait_timeout: float | None = Field(None, gt=0)
    max_replica_lag: float | None = Field(None, ge=0)
    max_replica_lag_bytes: int | None = Field(None, ge=0)
    replica_fallback: ReplicaFallback | None = None
    replica_affinity: ReplicaAffinity | None = None
    read_your_writes: ReadYourWrites | None = None
    statements_per_second: float | None = Field(None, gt=0)
    max_db_connections: int | None = Field(None, ge=1)
    allowed_cidrs: list[IPvAnyNetwork] | None = None


class TenantPatch(_Patch):
    """PATCH: only the fields given change; nested objects merge field by field, lists are
    replaced whole (as in JSON Merge Patch, RFC 7396)."""

    nullable = frozenset({"server_password", "tenant_key"})

    mode: TenantMode | None = None
    cluster: ClusterPatch | None = None
    database: Identifier | None = None
    server_user: Identifier | None = None
    server_password: SecretStr | None = None
    users: list[UserCreate] | None = None
    auth_query: bool | None = None
    pool: PoolPatch | None = None
    limits: LimitsPatch | None = None
    tenant_key: UUID | None = None
    paused: bool | None = None

    def apply(self, current: Tenant, now: datetime) -> Tenant:
        """The patched record. Raises pydantic's ValidationError when the result breaks a rule
        that spans fields (say min_size above the stored size)."""
        data = current.model_dump()
        changes = self.model_dump(exclude_unset=True, exclude={"users", "server_password"})
        _merge(data, changes)
        if "server_password" in self.model_fields_set:
            data["server_password"] = self.server_password
        if self.users is not None:
            data["users"] = tuple(user.to_user() for user in self.users)
        data.update(updated_at=now, version=current.version + 1)
        return Tenant.model_validate(data)


def _merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
    for name, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(name), dict):
            _merge(target[name], value)
        else:
            target[name] = value
