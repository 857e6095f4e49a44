"""Creating a tenant's database, and optionally its server role, on the tenant's primary before
its record is stored (POST /tenants with ``provision``).

Idempotent: what exists already (pg_database, pg_roles) is left alone, so provisioning a second
tenant into a shared database, or retrying after a failure, just works. All or nothing: what
this call created is dropped again if a later step fails, including the store write that
``provisioned()`` wraps, so a failed create leaves neither a record without a database nor a
database without a record.

Who creates them:
  - the database alone: the tenant's own ``server_user`` when it may (superuser or CREATEDB),
    so the database is owned by the role that will use it; otherwise the provisioning login;
  - with the role: always the provisioning login (CREATEROLE and CREATEDB, or a superuser).
The provisioning login is a libpq DSN given to ``create_app(provision_dsn=...)``; only its user,
password and options are used: host, port and database are the tenant's primary and
``postgres``.

The role's password is sent as a SCRAM-SHA-256 verifier computed here, never as plaintext, so
it does not appear in the server's statement log.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from router.config import ServerTLS
from router.protocol.auth import scram_verifier
from router.registry.models import TenantCreate

log = logging.getLogger("pgrouter.admin")

# The database every PostgreSQL cluster has, to connect to while the tenant's does not exist.
MAINTENANCE_DB = "postgres"
DEFAULT_TIMEOUT = 10.0

# SQLSTATEs (PostgreSQL documentation, Appendix A) of a concurrent provisioning that won.
_DUPLICATE_DATABASE = "42P04"
_DUPLICATE_OBJECT = "42710"


class ProvisionError(Exception):
    """The database or role could not be created (the API answers 502: the upstream failed)."""


@dataclass(slots=True)
class Provisioned:
    """What one provisioning created (None: it existed already, or was not asked for)."""

    role: str | None = None
    database: str | None = None


@asynccontextmanager
async def provisioned(
    body: TenantCreate,
    *,
    role: bool,
    provision_dsn: str | None,
    timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[Provisioned]:
    """Create what ``body`` needs, then run the caller's block (the store write); if the block
    raises, drop what was created and re-raise. Raises ProvisionError."""
    conn = await _connect(body, role=role, provision_dsn=provision_dsn, timeout=timeout)
    try:
        made = Provisioned()
        try:
            await _create(conn, body, role=role, made=made, timeout=timeout)
        except BaseException:
            await _undo(conn, made, timeout)
            raise
        try:
            yield made
        except BaseException:
            await _undo(conn, made, timeout)
            raise
    finally:
        await conn.close(timeout=timeout)


async def _connect(
    body: TenantCreate, *, role: bool, provision_dsn: str | None, timeout: float
) -> asyncpg.Connection:
    target = f"{body.cluster.primary.host}:{body.cluster.primary.port}"
    if role:
        if provision_dsn is None:
            raise ProvisionError(
                "provision_role needs a provisioning login (create_app(provision_dsn=...)); "
                "none is configured"
            )
        if body.server_password is None:
            raise ProvisionError("provision_role needs server_password (the new role's password)")
        return await _open(body, target, timeout, dsn=provision_dsn)
    own_error = None
    try:
        conn = await _open(
            body,
            target,
            timeout,
            user=body.server_user,
            password=(body.server_password.get_secret_value() if body.server_password else None),
        )
    except ProvisionError as exc:
        own_error = str(exc)
    else:
        if await conn.fetchval(
            "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user",
            timeout=timeout,
        ):
            return conn
        await conn.close(timeout=timeout)
        own_error = f'server_user "{body.server_user}" may not create databases'
    if provision_dsn is None:
        raise ProvisionError(f"{own_error}, and no provisioning login is configured")
    return await _open(body, target, timeout, dsn=provision_dsn)


async def _open(
    body: TenantCreate, target: str, timeout: float, **login: Any
) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            host=body.cluster.primary.host,
            port=body.cluster.primary.port,
            database=MAINTENANCE_DB,
            ssl=_ssl(body),
            timeout=timeout,
            command_timeout=timeout,
            **login,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ProvisionError(f"cannot connect to {target}: {_describe(exc)}") from exc


def _ssl(body: TenantCreate) -> bool | str | ssl.SSLContext:
    tls = body.cluster.tls
    if tls is ServerTLS.VERIFY_FULL:
        return ssl.create_default_context(cafile=body.cluster.tls_ca)
    if tls is ServerTLS.DISABLE:
        return False
    return str(tls)  # asyncpg takes libpq's sslmode names: prefer, require


async def _create(
    conn: asyncpg.Connection, body: TenantCreate, *, role: bool, made: Provisioned, timeout: float
) -> None:
    try:
        if role and not await conn.fetchval(
            "SELECT true FROM pg_roles WHERE rolname = $1", body.server_user, timeout=timeout
        ):
            assert body.server_password is not None  # checked by _connect
            verifier = scram_verifier(body.server_password.get_secret_value())
            if await _execute_formatted(
                conn,
                "CREATE ROLE %I LOGIN PASSWORD %L",
                [body.server_user, verifier],
                _DUPLICATE_OBJECT,
                timeout,
            ):
                made.role = body.server_user
                log.info("provisioned role %s", body.server_user)
        if not await conn.fetchval(
            "SELECT true FROM pg_database WHERE datname = $1", body.database, timeout=timeout
        ):
            is_owner = await conn.fetchval("SELECT current_user = $1", body.server_user)
            if is_owner:
                statement, args = "CREATE DATABASE %I", [body.database]
            else:
                statement, args = "CREATE DATABASE %I OWNER %I", [body.database, body.server_user]
            if await _execute_formatted(conn, statement, args, _DUPLICATE_DATABASE, timeout):
                made.database = body.database
                log.info("provisioned database %s", body.database)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ProvisionError(f"cannot provision tenant {body.tenant_id}: {_describe(exc)}") from exc


async def _execute_formatted(
    conn: asyncpg.Connection, template: str, args: list[str], exists_state: str, timeout: float
) -> bool:
    """Run a utility statement built by the server's format() (%I quotes identifiers, %L
    literals: utility statements take no parameters). False when a concurrent provisioning
    created the object first."""
    placeholders = ", ".join(f"${i}::text" for i in range(1, len(args) + 1))
    sql = await conn.fetchval(f"SELECT format('{template}', {placeholders})", *args)
    try:
        await conn.execute(sql, timeout=timeout)
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == exists_state:
            return False
        raise
    return True


async def _undo(conn: asyncpg.Connection, made: Provisioned, timeout: float) -> None:
    """Drop what this provisioning created (database first: the role owns it)."""
    steps = []
    if made.database is not None:
        steps.append(("DROP DATABASE IF EXISTS %I", made.database))
    if made.role is not None:
        steps.append(("DROP ROLE IF EXISTS %I", made.role))
    for template, name in steps:
        try:
            await _execute_formatted(conn, template, [name], "", timeout)
            log.info("provisioning undone: %s", template.replace("%I", name))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The original failure is what the caller reports; this one needs an operator.
            log.error("could not undo provisioning (%s): %s", template.replace("%I", name), exc)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{text} (SQLSTATE {sqlstate})" if sqlstate else text
