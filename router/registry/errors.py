"""What the registry can fail with, as typed errors.

They are ``RouterError``s so that a failure met while a client logs in (unknown tenant, Redis
down, a record we cannot decrypt) reaches the client as an ErrorResponse through the one place
that reports errors, with a SQLSTATE chosen here. The admin API maps the same classes to HTTP
statuses (TenantNotFound 404, TenantExists 409, VersionConflict 412, RegistryUnavailable 503).

SQLSTATE values come from Appendix A of the PostgreSQL documentation.
"""

from __future__ import annotations

from router.protocol.errors import RouterError, SQLState

# Appendix A codes the rest of the router does not emit, so SQLState does not name them.
_DUPLICATE_OBJECT = "42710"
_SERIALIZATION_FAILURE = "40001"
_UNDEFINED_OBJECT = "42704"


class RegistryError(RouterError):
    """Base class: every failure of the tenant registry."""

    sqlstate_default = SQLState.INTERNAL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(self.sqlstate_default, message)


class RegistryUnavailable(RegistryError):
    """Redis cannot be reached (refused, timed out, failing over) and the answer is not cached."""

    # 57P03 cannot_connect_now: the client may retry later, as during a server start-up.
    sqlstate_default = SQLState.CANNOT_CONNECT_NOW


class TenantNotFound(RegistryError):
    # 3D000 invalid_catalog_name: what PostgreSQL says for an unknown database.
    sqlstate_default = SQLState.INVALID_CATALOG_NAME

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f'tenant "{tenant_id}" does not exist')
        self.tenant_id = tenant_id


class TenantExists(RegistryError):
    sqlstate_default = _DUPLICATE_OBJECT

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f'tenant "{tenant_id}" already exists')
        self.tenant_id = tenant_id


class VersionConflict(RegistryError):
    """The record changed since the caller read it (optimistic concurrency, HTTP 412)."""

    sqlstate_default = _SERIALIZATION_FAILURE

    def __init__(self, tenant_id: str, expected: int, current: int) -> None:
        super().__init__(
            f'tenant "{tenant_id}" is at version {current}, not the expected {expected}'
        )
        self.tenant_id = tenant_id
        self.expected = expected
        self.current = current


class RegistryDecryptError(RegistryError):
    """A stored secret cannot be decrypted: unknown key id, wrong key, or altered bytes.

    Fail closed: the tenant is unusable until the keyring is fixed; nothing falls back to an
    empty or unverified password.
    """

    def __init__(self, tenant_id: str, kid: str, reason: str) -> None:
        super().__init__(
            f'cannot decrypt the server_password of tenant "{tenant_id}" (key id "{kid}"): {reason}'
        )
        self.tenant_id = tenant_id
        self.kid = kid


class UserNotFound(RegistryError):
    # undefined_object: PostgreSQL's answer for an unknown role.
    sqlstate_default = _UNDEFINED_OBJECT

    def __init__(self, tenant_id: str, name: str) -> None:
        super().__init__(f'tenant "{tenant_id}" has no user "{name}"')
        self.tenant_id = tenant_id
        self.name = name
