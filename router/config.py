"""Settings: a TOML file plus PGROUTER_* environment variables (environment wins).

This is the only module that reads the environment; everything else receives these typed
objects as arguments.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from enum import StrEnum
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from router.protocol.auth import is_scram_verifier
from router.protocol.framing import DEFAULT_MAX_MESSAGE_SIZE


class PoolMode(StrEnum):
    TRANSACTION = "transaction"
    SESSION = "session"


class ClientTLS(StrEnum):
    DISABLE = "disable"
    ALLOW = "allow"
    REQUIRE = "require"


class ServerTLS(StrEnum):
    DISABLE = "disable"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_FULL = "verify-full"


class ChannelBinding(StrEnum):
    DISABLE = "disable"
    PREFER = "prefer"
    REQUIRE = "require"


class AuthMethod(StrEnum):
    SCRAM = "scram-sha-256"
    MD5 = "md5"
    TRUST = "trust"


def address_allowed(networks: Sequence[IPvAnyNetwork], address: str | None) -> bool:
    """Whether a client at ``address`` (None: a Unix socket) may log in under an
    allowed_cidrs list; an empty list admits everyone."""
    if not networks:
        return True
    try:
        ip = ip_address(address or "")
    except ValueError:
        return False  # not an IP client (a Unix socket): only an empty list admits it
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.1.2.3 on a dual-stack listener
    return any(ip in network for network in networks)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TransactionRouting(StrEnum):
    CONSERVATIVE = "conservative"
    FIRST_STATEMENT = "first_statement"


class ReplicaFallback(StrEnum):
    PRIMARY = "primary"
    ERROR = "error"


class ReplicaAffinity(StrEnum):
    TRANSACTION = "transaction"
    SESSION = "session"


class ReadYourWrites(StrEnum):
    SESSION = "session"  # a session's reads wait for its own writes
    TENANT = "tenant"  # every session of a tenant (or database entry) waits for any of theirs
    OFF = "off"


class NodeAddress(_Strict):
    host: str
    port: int = Field(5432, ge=1, le=65535)
    # Share of reads relative to the cluster's other replicas (0 drains the node).
    weight: float = Field(1.0, ge=0)


class ClusterConfig(_Strict):
    primary: NodeAddress
    replicas: list[NodeAddress] = []
    # A replica further behind than either limit serves no reads until it is back under.
    max_replica_lag: float = Field(1.0, ge=0)  # seconds
    max_replica_lag_bytes: int | None = Field(None, ge=0)
    # No eligible replica: run the read on the primary, or fail it with SQLSTATE 57P03.
    replica_fallback: ReplicaFallback = ReplicaFallback.PRIMARY
    # Among the least busy eligible replicas: a random one for each read (transaction), or
    # the one the client read from last while it is among them (session).
    replica_affinity: ReplicaAffinity = ReplicaAffinity.TRANSACTION
    # What the topology monitor logs in as (default: the server_user/password of the first
    # database on this cluster, else postgres) and to which database.
    monitor_user: str | None = None
    monitor_password: str | None = None
    monitor_dbname: str = "postgres"


class DatabaseConfig(_Strict):
    """A database name clients ask for, and where its server connections go."""

    cluster: str
    dbname: str | None = None  # the real database name; defaults to the name clients use
    server_user: str | None = None  # defaults to the client's user name
    server_password: str | None = None
    pool_size: int | None = Field(None, ge=1)
    min_pool_size: int | None = Field(None, ge=0)  # default: the global setting
    pool_mode: PoolMode | None = None
    query_wait_timeout: float | None = Field(None, gt=0)  # default: the global setting
    # Server connections all pools of the real database may hold together on a node (0 = no
    # cap); default: the global setting. Entries naming one real database: the smallest cap.
    max_db_connections: int | None = Field(None, ge=0)
    reserve_pool_size: int | None = Field(None, ge=0)  # default: the global setting
    server_tls: ServerTLS | None = None  # default: the global server_tls / server_tls_ca
    server_tls_ca: Path | None = None


class UserConfig(_Strict):
    """A client login. `password` holds a SCRAM verifier for scram-sha-256 (make one with
    `pgrouter hash-password`), the md5 hash ('md5' + md5(password + user)) for md5."""

    auth: AuthMethod = AuthMethod.SCRAM
    password: str | None = None
    # Client addresses this login may come from ("10.0.0.0/8"); empty: any. Checked after
    # authentication, as for a tenant's allowed_cidrs.
    allowed_cidrs: list[IPvAnyNetwork] = []

    @model_validator(mode="after")
    def _check_secret(self) -> UserConfig:
        if self.auth is AuthMethod.SCRAM and not (self.password and is_scram_verifier(self.password)):
            raise ValueError("scram-sha-256 users need `password` holding a SCRAM-SHA-256 verifier")
        if self.auth is AuthMethod.MD5 and not (
            self.password and self.password.startswith("md5") and len(self.password) == 35
        ):
            raise ValueError("md5 users need `password` holding 'md5' + md5(password + user)")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PGROUTER_", env_nested_delimiter="__", extra="forbid"
    )

    listen_host: str = "127.0.0.1"
    listen_port: int = Field(6432, ge=0, le=65535)
    # Also listen on <unix_socket_dir>/.s.PGSQL.<port> (libpq's host=<dir>); "" = TCP only.
    unix_socket_dir: str = ""
    unix_socket_mode: int = Field(0o777, ge=0, le=0o777)

    pool_mode: PoolMode = PoolMode.TRANSACTION
    pool_size: int = Field(20, ge=1)
    min_pool_size: int = Field(0, ge=0)
    max_client_conn: int = Field(1000, ge=1)
    query_wait_timeout: float = Field(120.0, gt=0)
    server_idle_timeout: float = Field(600.0, ge=0)  # 0 = never close idle servers
    server_lifetime: float = Field(3600.0, ge=0)  # 0 = no limit
    server_connect_timeout: float = Field(5.0, gt=0)
    # A client holding a server connection inside a transaction, sending nothing, for longer
    # than this is disconnected (25P03) and its transaction rolled back; 0 = never.
    idle_transaction_timeout: float = Field(0.0, ge=0)
    # A client outside any transaction sending nothing for longer than this is disconnected
    # (57P05, as PostgreSQL's idle_session_timeout); 0 = never.
    client_idle_timeout: float = Field(0.0, ge=0)
    # A Query or Sync whose ReadyForQuery has not come back after this long: the query is
    # cancelled, its server connection closed and the client disconnected (57014); 0 = never.
    query_timeout: float = Field(0.0, ge=0)
    # TCP keepalive on client and server sockets (router/sockopts.py); 0 = the kernel's value.
    tcp_keepalive: bool = True
    tcp_keepidle: int = Field(0, ge=0)  # seconds idle before the first probe
    tcp_keepintvl: int = Field(0, ge=0)  # seconds between probes
    tcp_keepcnt: int = Field(0, ge=0)  # unanswered probes before the connection is dropped
    # Server connections all pools of one database (or one server user) may hold together on
    # one node, whatever pool_size says; 0 = no cap. Not live: a restart applies a change.
    max_db_connections: int = Field(0, ge=0)
    max_user_connections: int = Field(0, ge=0)
    # A client that has waited reserve_pool_timeout seconds for a server connection lets its
    # pool open up to reserve_pool_size connections beyond pool_size, closed again when they
    # come back with no client waiting (PgBouncer's settings); either 0 = no reserve.
    reserve_pool_size: int = Field(0, ge=0)
    reserve_pool_timeout: float = Field(5.0, ge=0)
    server_reset_query: str = "DISCARD ALL"
    # Per server connection, in transaction mode: router-owned prepared statements kept
    # (least recently used ones are closed beyond this).
    max_prepared_statements: int = Field(250, ge=1)
    client_login_timeout: float = Field(15.0, gt=0)
    max_message_size: int = Field(DEFAULT_MAX_MESSAGE_SIZE, ge=1024)

    client_tls: ClientTLS = ClientTLS.DISABLE
    client_tls_cert: Path | None = None
    client_tls_key: Path | None = None
    server_tls: ServerTLS = ServerTLS.DISABLE
    server_tls_ca: Path | None = None
    # SCRAM-SHA-256-PLUS (tls-server-end-point) when the server offers it over TLS.
    server_channel_binding: ChannelBinding = ChannelBinding.PREFER
    # application_name of the router's own server connections, as seen in pg_stat_activity.
    server_application_name: str = "pgrouter"

    log_level: str = "INFO"
    # Logins of the settings file's [users] who may open the admin console: database "pgrouter"
    # (router/admin/console.py: SHOW POOLS, SHOW CLIENTS, ...).
    admin_console_users: list[str] = []
    # One INFO line per client login / per logged-in client leaving (off, as in PostgreSQL).
    log_connections: bool = False
    log_disconnections: bool = False
    # Query statistics (GET /queries): fingerprints kept, those with the most total time;
    # 0 turns statistics off. Calls slower than slow_query_ms are logged (0: no slow-query log).
    query_stats_max: int = Field(1000, ge=0)
    slow_query_ms: float = Field(1000.0, ge=0)
    # Seconds over which SHOW STATS / GET /stats average (PgBouncer's stats_period).
    stats_period: int = Field(60, ge=1)
    log_format: str = Field("json", pattern="^(json|text)$")  # json: one event per line

    # Read/write splitting (clusters with replicas; README "Read/write splitting").
    lag_check_interval: float = Field(0.25, gt=0)
    transaction_routing: TransactionRouting = TransactionRouting.CONSERVATIVE
    read_your_writes: ReadYourWrites = ReadYourWrites.SESSION
    # How often each database's function volatilities (pg_proc) are re-read.
    function_catalog_refresh: float = Field(60.0, gt=0)

    # Tenant registry (README "Tenants"): Redis URL (redis://, rediss://, redis+sentinel://,
    # redis+cluster://); none: only the databases and users of this file.
    redis_url: str | None = None
    secret_key: SecretStr | None = None  # "kid:base64key": seals server passwords in Redis
    old_secret_keys: list[SecretStr] = []  # older keys, still accepted for reading
    registry_prefix: str = "pgrouter:"
    registry_cache_ttl: float = Field(30.0, gt=0)
    # Shared-schema tenants: the setting that carries the tenant's key on server connections.
    tenant_setting: str = "app.current_tenant"
    # With client TLS: a client that names host <tenant>.<this suffix> (TLS SNI, as libpq sends
    # the host it connects to) asks for that tenant, when it exists. None: SNI is not looked at.
    tenant_sni_suffix: str | None = None
    # Admin HTTP API (README "Admin API"); port 0 picks a free one, -1 disables the API.
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(8080, ge=-1, le=65535)
    admin_token: SecretStr | None = None  # bearer token; none: the tenant endpoints refuse all
    metrics_public: bool = True  # /metrics without the token
    metrics_max_tenant_labels: int = Field(100, ge=1)  # more tenants are labelled "other"
    # POST /tenants with provision: the login that creates databases/roles when the tenant's
    # own server_user may not (postgresql://user:password@host:port/postgres).
    admin_provision_dsn: SecretStr | None = None
    tenant_drop_timeout: float = Field(10.0, ge=0)  # DELETE: in-flight transactions may finish
    shutdown_timeout: float = Field(30.0, ge=0)
    workers: int = Field(1, ge=1)

    clusters: dict[str, ClusterConfig] = {}
    databases: dict[str, DatabaseConfig] = {}
    users: dict[str, UserConfig] = {}

    @field_validator("tenant_sni_suffix")
    @classmethod
    def _sni_suffix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().strip(".").lower()
        if not value or any(not label for label in value.split(".")):
            raise ValueError("tenant_sni_suffix must be a DNS name such as db.example.com")
        return value

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for name, db in self.databases.items():
            if db.cluster not in self.clusters:
                raise ValueError(f"database {name!r} names unknown cluster {db.cluster!r}")
        if self.client_tls is not ClientTLS.DISABLE and not (
            self.client_tls_cert and self.client_tls_key
        ):
            raise ValueError("client_tls needs client_tls_cert and client_tls_key")
        if self.server_tls is ServerTLS.VERIFY_FULL and not self.server_tls_ca:
            raise ValueError("server_tls = verify-full needs server_tls_ca")
        if self.min_pool_size > self.pool_size:
            raise ValueError("min_pool_size must not exceed pool_size")
        self._check_shared_pools()
        return self

    def _check_shared_pools(self) -> None:
        """[databases] entries that can meet in one pool (same node, real database, server
        user, pool mode and server TLS: PoolKey) must agree on what the pool takes from its
        entry, or the pool would follow whichever entry made it first."""
        nodes = {
            name: {(n.host, n.port) for n in (c.primary, *c.replicas)} for name, c in self.clusters.items()
        }

        def real(name: str, db: DatabaseConfig) -> str | None:  # None: the client's (a "*" entry)
            return db.dbname or (None if name == "*" else name)

        def kind(db: DatabaseConfig) -> tuple:
            own_tls = db.server_tls is not None
            return (
                db.pool_mode or self.pool_mode,
                db.server_tls if own_tls else self.server_tls,
                db.server_tls_ca if own_tls else self.server_tls_ca,
            )

        def pool_values(db: DatabaseConfig) -> dict[str, object]:
            return {
                "pool_size": db.pool_size or self.pool_size,
                "min_pool_size": self.min_pool_size if db.min_pool_size is None else db.min_pool_size,
                "query_wait_timeout": db.query_wait_timeout or self.query_wait_timeout,
                "reserve_pool_size": self.reserve_pool_size if db.reserve_pool_size is None else db.reserve_pool_size,
                "server_password": db.server_password,
            }

        entries = list(self.databases.items())
        for i, (name, db) in enumerate(entries):
            for other, odb in entries[i + 1 :]:
                a, b = real(name, db), real(other, odb)
                if not (
                    nodes.get(db.cluster, set()) & nodes.get(odb.cluster, set())
                    and (a == b or (a is None and b not in self.databases) or (b is None and a not in self.databases))
                    and (db.server_user is None or odb.server_user is None or db.server_user == odb.server_user)
                    and kind(db) == kind(odb)
                ):
                    continue
                mine, theirs = pool_values(db), pool_values(odb)
                differ = [field for field in mine if mine[field] != theirs[field]]
                if differ:
                    raise ValueError(
                        f"databases {name!r} and {other!r} share pools (same real database, server "
                        f"user, pool mode and server TLS on a node) but differ in {', '.join(differ)}: "
                        "give them the same values, or another server_user"
                    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: it wins over the file's values passed as init arguments.
        return (env_settings, init_settings)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Settings from a TOML file (optional), then PGROUTER_* variables, then ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    data.update(overrides)
    return Settings(**data)
