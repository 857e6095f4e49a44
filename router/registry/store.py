"""The tenant registry in Redis: the source of truth behind every router's TenantCache.

Layout (all keys under one prefix, so that with Redis Cluster a ``{hash tag}`` in the prefix
keeps them in one slot, which the write script needs):

    {prefix}tenant:{id}   JSON {"format": 1, "tenant": {...}, "server_password": {kid, nonce, ct}}
    {prefix}tenants       set of tenant ids
    {prefix}version       registry version: INCR on every write, never reset by a write
    {prefix}invalidate    pub/sub channel: {"id", "version", "registry_version"[, "deleted"]}

Every write is one Lua script, so it is atomic on the server: it checks the record's state
(exists or not, at the version the caller read) and only then writes the record, keeps the id
set in step, bumps the registry version and publishes the invalidation. A read-modify-write
(update, patch, users, pause) reads the record, computes the new one here (hashing passwords,
sealing the server password) and hands the script the version it read: a concurrent writer in
between makes the script refuse (VersionConflict), and nothing half-written is ever visible.

Pub/sub is fire-and-forget: a subscriber that was disconnected misses messages. That is what
the registry version is for: after reconnecting, a cache compares it with the last one it saw
and reloads when they differ (see cache.py). URLs and clients: connect.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from router.registry.connect import RedisConnection, connect
from router.registry.crypto import EncryptedSecret, Keyring
from router.registry.errors import (
    RegistryError,
    TenantExists,
    TenantNotFound,
    UserNotFound,
    VersionConflict,
)
from router.registry.invalidation import Subscription
from router.registry.models import Tenant, TenantCreate, TenantPatch, TenantUpdate, UserCreate

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
# Read-modify-writes without a caller's expected version retry a lost race this many times.
MODIFY_ATTEMPTS = 10
# Ids fetched per MGET when listing: bounded replies, no multi-megabyte allocation at once.
MGET_CHUNK = 500

# KEYS: tenant key, id set, registry version counter.
# ARGV: op (create | replace | delete), tenant id, expected tenant version ('' = any),
#       new record JSON, new tenant version, invalidation channel.
# Returns {status, n}: {'ok', registry version} | {'exists', v} | {'missing', 0} | {'conflict', v}.
_WRITE_SCRIPT = """
local op, id, expected = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('GET', KEYS[1])
if op == 'create' then
  if current then
    return {'exists', cjson.decode(current)['tenant']['version']}
  end
else
  if not current then
    return {'missing', 0}
  end
  local version = cjson.decode(current)['tenant']['version']
  if expected ~= '' and tonumber(expected) ~= version then
    return {'conflict', version}
  end
end
local message = {id = id}
if op == 'delete' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], id)
  message['version'] = cjson.null
  message['deleted'] = true
else
  redis.call('SET', KEYS[1], ARGV[4])
  redis.call('SADD', KEYS[2], id)
  message['version'] = tonumber(ARGV[5])
end
local registry_version = redis.call('INCR', KEYS[3])
message['registry_version'] = registry_version
redis.call('PUBLISH', ARGV[6], cjson.encode(message))
return {'ok', registry_version}
"""


class RedisStore:
    """Tenant records in Redis. Reads and writes; no caching (that is TenantCache's job).

    Owns its connection: ``close()`` closes it.
    """

    def __init__(self, connection: RedisConnection, keyring: Keyring) -> None:
        self._connection = connection
        self._keyring = keyring
        self.client = connection.client
        self.prefix = connection.prefix
        self.channel = f"{self.prefix}invalidate"
        self._ids_key = f"{self.prefix}tenants"
        self._version_key = f"{self.prefix}version"
        self._write_script = self.client.register_script(_WRITE_SCRIPT)

    @classmethod
    def from_url(
        cls,
        url: str,
        keyring: Keyring,
        *,
        prefix: str | None = None,
        socket_timeout: float = 2.0,
        connect_timeout: float = 2.0,
    ) -> RedisStore:
        """A store on ``url``: which URL kinds, see ``connect()``."""
        connection = connect(
            url, prefix=prefix, socket_timeout=socket_timeout, connect_timeout=connect_timeout
        )
        return cls(connection, keyring)

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    async def close(self) -> None:
        await self._connection.close()

    def subscribe(self) -> Subscription:
        """A subscription to this registry's invalidations (``async with`` it)."""
        return Subscription(self._connection, self.channel)

    def subscribe_to(self, name: str, parse: Callable[[str | bytes], Any]) -> Subscription:
        """A subscription to another channel under this registry's prefix (``{prefix}name``)."""
        return Subscription(self._connection, f"{self.prefix}{name}", parse)

    async def publish(self, name: str, message: str) -> None:
        """Publish on ``{prefix}name``. Raises RegistryUnavailable when Redis is down."""
        with self._reaching_redis():
            await self.client.publish(f"{self.prefix}{name}", message)

    # -- reads ----------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raises RegistryUnavailable when Redis does not answer (for /readyz)."""
        with self._reaching_redis():
            await self.client.ping()

    async def registry_version(self) -> int:
        with self._reaching_redis():
            value = await self.client.get(self._version_key)
        return int(value) if value is not None else 0

    async def get(self, tenant_id: str) -> Tenant:
        with self._reaching_redis():
            raw = await self.client.get(self._tenant_key(tenant_id))
        if raw is None:
            raise TenantNotFound(tenant_id)
        return self._decode(tenant_id, raw)

    async def get_many(self, tenant_ids: Sequence[str]) -> dict[str, Tenant | None]:
        """Each id's record, None for those that do not exist."""
        found: dict[str, Tenant | None] = {}
        for start in range(0, len(tenant_ids), MGET_CHUNK):
            chunk = tenant_ids[start : start + MGET_CHUNK]
            with self._reaching_redis():
                raws = await self.client.mget([self._tenant_key(t) for t in chunk])
            for tenant_id, raw in zip(chunk, raws, strict=True):
                found[tenant_id] = None if raw is None else self._decode(tenant_id, raw)
        return found

    async def list_ids(self) -> list[str]:
        with self._reaching_redis():
            return sorted(await self.client.smembers(self._ids_key))

    async def list_tenants(self) -> list[Tenant]:
        found = await self.get_many(await self.list_ids())
        return [tenant for tenant in found.values() if tenant is not None]

    # -- writes ---------------------------------------------------------------------------

    async def create(self, body: TenantCreate) -> Tenant:
        """Raises TenantExists."""
        tenant = body.to_tenant(_now())
        await self._write("create", tenant.tenant_id, self._encode(tenant), None, 1)
        return tenant

    async def update(
        self, tenant_id: str, body: TenantUpdate, *, expected_version: int | None = None
    ) -> Tenant:
        """Replace everything but the identity (PUT). Raises TenantNotFound, VersionConflict."""
        return await self._modify(tenant_id, body.apply, expected_version)

    async def patch(
        self, tenant_id: str, body: TenantPatch, *, expected_version: int | None = None
    ) -> Tenant:
        """Change the fields given. Also raises pydantic's ValidationError when the patched
        record would break a rule spanning fields."""
        return await self._modify(tenant_id, body.apply, expected_version)

    async def delete(self, tenant_id: str, *, expected_version: int | None = None) -> None:
        await self._write("delete", tenant_id, "", expected_version, None)

    async def add_user(
        self, tenant_id: str, user: UserCreate, *, expected_version: int | None = None
    ) -> Tenant:
        """Add a client login, or replace the one of the same name (a password change)."""
        stored = user.to_user()  # hash once, outside the retry loop

        def change(current: Tenant, now: datetime) -> Tenant:
            users = [u for u in current.users if u.name != stored.name]
            return _changed(current, now, users=(*users, stored))

        return await self._modify(tenant_id, change, expected_version)

    async def remove_user(
        self, tenant_id: str, name: str, *, expected_version: int | None = None
    ) -> Tenant:
        """Raises UserNotFound when the tenant has no such login."""

        def change(current: Tenant, now: datetime) -> Tenant:
            if current.user(name) is None:
                raise UserNotFound(tenant_id, name)
            users = tuple(u for u in current.users if u.name != name)
            return _changed(current, now, users=users)

        return await self._modify(tenant_id, change, expected_version)

    async def pause(self, tenant_id: str, *, expected_version: int | None = None) -> Tenant:
        return await self._set_paused(tenant_id, True, expected_version)

    async def resume(self, tenant_id: str, *, expected_version: int | None = None) -> Tenant:
        return await self._set_paused(tenant_id, False, expected_version)

    async def rotate_keys(self, new_keyring: Keyring) -> int:
        """Re-seal every server password not yet under ``new_keyring``'s current key, each
        record atomically (a concurrent write makes that record be redone). ``new_keyring``
        opens the old ciphertexts, so it must still hold the old keys. Returns how many records
        were re-sealed; running it again re-seals none. The store uses ``new_keyring`` after.

        Records keep their version: the tenant did not change, so caches keep their entries.
        """
        count = 0
        for tenant_id in await self.list_ids():
            if await self._reseal(tenant_id, new_keyring):
                count += 1
        self._keyring = new_keyring
        return count

    # -- internals ------------------------------------------------------------------------

    def _reaching_redis(self) -> AbstractContextManager[None]:
        return self._connection.reaching_redis()

    def _tenant_key(self, tenant_id: str) -> str:
        return f"{self.prefix}tenant:{tenant_id}"

    async def _write(
        self,
        op: str,
        tenant_id: str,
        record: str,
        expected_version: int | None,
        new_version: int | None,
    ) -> int:
        keys = [self._tenant_key(tenant_id), self._ids_key, self._version_key]
        args = [
            op,
            tenant_id,
            "" if expected_version is None else expected_version,
            record,
            "" if new_version is None else new_version,
            self.channel,
        ]
        with self._reaching_redis():
            status, value = await self._write_script(keys=keys, args=args, client=self.client)
        if status == "ok":
            return int(value)
        if status == "exists":
            raise TenantExists(tenant_id)
        if status == "missing":
            raise TenantNotFound(tenant_id)
        if status == "conflict":
            raise VersionConflict(tenant_id, expected_version or 0, int(value))
        raise RegistryError(f"unexpected reply from the registry write script: {status!r}")

    async def _modify(
        self,
        tenant_id: str,
        change: Callable[[Tenant, datetime], Tenant],
        expected_version: int | None,
    ) -> Tenant:
        """Read, change, write back if nobody wrote in between. With ``expected_version`` the
        caller's read is the one that counts: one attempt. Without, a lost race is retried."""
        attempts = 1 if expected_version is not None else MODIFY_ATTEMPTS
        for attempt in range(attempts):
            current = await self.get(tenant_id)
            if expected_version is not None and current.version != expected_version:
                raise VersionConflict(tenant_id, expected_version, current.version)
            tenant = change(current, _now())
            try:
                await self._write(
                    "replace", tenant_id, self._encode(tenant), current.version, tenant.version
                )
                return tenant
            except VersionConflict as conflict:
                if expected_version is not None or attempt + 1 == attempts:
                    raise VersionConflict(
                        tenant_id, expected_version or current.version, conflict.current
                    ) from None
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _set_paused(
        self, tenant_id: str, paused: bool, expected_version: int | None
    ) -> Tenant:
        return await self._modify(
            tenant_id, lambda current, now: _changed(current, now, paused=paused), expected_version
        )

    async def _reseal(self, tenant_id: str, keyring: Keyring) -> bool:
        for _ in range(MODIFY_ATTEMPTS):
            with self._reaching_redis():
                raw = await self.client.get(self._tenant_key(tenant_id))
            if raw is None:
                return False  # deleted meanwhile
            record = _parse_record(tenant_id, raw)
            sealed = record.get("server_password")
            if sealed is None:
                return False
            secret = EncryptedSecret.from_json(sealed, tenant_id=tenant_id)
            if secret.kid == keyring.current_kid:
                return False
            plaintext = keyring.decrypt(secret, tenant_id=tenant_id)
            record["server_password"] = keyring.encrypt(plaintext, tenant_id=tenant_id).to_json()
            version = record["tenant"]["version"]
            try:
                await self._write("replace", tenant_id, json.dumps(record), version, version)
                return True
            except VersionConflict:
                continue  # written meanwhile, perhaps under another key: look again
        raise RegistryError(f'tenant "{tenant_id}" kept changing while its key was rotated')

    def _encode(self, tenant: Tenant) -> str:
        secret = tenant.server_password
        sealed = (
            None
            if secret is None
            else self._keyring.encrypt(secret.get_secret_value(), tenant_id=tenant.tenant_id)
        )
        record = {
            "format": RECORD_FORMAT,
            "tenant": tenant.model_dump(mode="json", exclude={"server_password"}),
            "server_password": None if sealed is None else sealed.to_json(),
        }
        return json.dumps(record, separators=(",", ":"))

    def _decode(self, tenant_id: str, raw: str | bytes) -> Tenant:
        record = _parse_record(tenant_id, raw)
        sealed = record.get("server_password")
        password = None
        if sealed is not None:
            secret = EncryptedSecret.from_json(sealed, tenant_id=tenant_id)
            password = self._keyring.decrypt(secret, tenant_id=tenant_id)
        try:
            return Tenant.model_validate({**record["tenant"], "server_password": password})
        except ValidationError as exc:
            raise RegistryError(
                f'the stored record of tenant "{tenant_id}" is invalid: {exc}'
            ) from exc


def _parse_record(tenant_id: str, raw: str | bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
        if record.get("format") != RECORD_FORMAT or not isinstance(record.get("tenant"), dict):
            raise ValueError(f"unknown record format {record.get('format')!r}")
        return record
    except (ValueError, AttributeError) as exc:
        raise RegistryError(
            f'the stored record of tenant "{tenant_id}" is unreadable: {exc}'
        ) from exc


def _changed(current: Tenant, now: datetime, **fields: Any) -> Tenant:
    """``current`` with ``fields`` replaced, validated again, as the next version."""
    data = current.model_dump()
    data.update(fields, updated_at=now, version=current.version + 1)
    return Tenant.model_validate(data)


def _now() -> datetime:
    return datetime.now(UTC)
