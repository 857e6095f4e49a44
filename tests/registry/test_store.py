"""RedisStore against a real redis-server: CRUD, optimistic concurrency, atomic writes with their
invalidation messages, encryption at rest and key rotation, and Redis being away."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from router.registry.connect import CLUSTER_PREFIX, cluster_prefix
from router.registry.crypto import Keyring, generate_key
from router.registry.errors import (
    RegistryDecryptError,
    RegistryUnavailable,
    TenantExists,
    TenantNotFound,
    UserNotFound,
    VersionConflict,
)
from router.registry.invalidation import Invalidation
from router.registry.models import TenantPatch, TenantUpdate, UserCreate
from router.registry.store import RedisStore
from tests.registry.conftest import RedisServer, free_port, scram_matches, tenant_input


def raw_record(server: RedisServer, tenant_id: str, prefix: str = "pgrouter:") -> dict:
    return json.loads(server.client().get(f"{prefix}tenant:{tenant_id}"))


def full(tenant) -> dict:
    """A record's every field, the server password in clear."""
    data = tenant.model_dump()
    data["server_password"] = tenant.server_password and tenant.server_password.get_secret_value()
    return data


async def test_create_then_get_round_trips(store: RedisStore) -> None:
    created = await store.create(
        tenant_input("acme", users=[{"name": "alice", "password": "al-pw"}])
    )
    fetched = await store.get("acme")
    assert full(fetched) == full(created)
    assert fetched.version == 1 and fetched.server_password.get_secret_value() == "server-secret"
    assert scram_matches(fetched.user("alice").verifier, "al-pw")
    assert await store.list_ids() == ["acme"]
    assert [t.tenant_id for t in await store.list_tenants()] == ["acme"]


async def test_secrets_at_rest(store: RedisStore, redis_server: RedisServer) -> None:
    await store.create(tenant_input("acme", users=[{"name": "alice", "password": "al-pw"}]))
    text = redis_server.client().get("pgrouter:tenant:acme")
    assert "server-secret" not in text and "al-pw" not in text
    record = json.loads(text)
    assert set(record["server_password"]) == {"kid", "nonce", "ct"}
    assert record["server_password"]["kid"] == "k1"
    assert "server_password" not in record["tenant"]
    assert record["tenant"]["users"][0]["verifier"].startswith("SCRAM-SHA-256$")


async def test_create_existing_is_refused_and_writes_nothing(store: RedisStore) -> None:
    await store.create(tenant_input("acme"))
    version = await store.registry_version()
    with pytest.raises(TenantExists, match='"acme" already exists'):
        await store.create(tenant_input("acme", database="other"))
    assert (await store.get("acme")).database == "app"
    assert await store.registry_version() == version


async def test_missing_tenant(store: RedisStore) -> None:
    body = TenantUpdate.model_validate(
        {"cluster": {"primary": {"host": "h"}}, "database": "d", "server_user": "u"}
    )
    calls: list[Callable[[], object]] = [
        lambda: store.get("ghost"),
        lambda: store.update("ghost", body),
        lambda: store.patch("ghost", TenantPatch(paused=True)),
        lambda: store.delete("ghost"),
        lambda: store.add_user("ghost", UserCreate(name="a", auth="trust")),
        lambda: store.remove_user("ghost", "a"),
        lambda: store.pause("ghost"),
        lambda: store.resume("ghost", expected_version=1),
    ]
    for call in calls:
        with pytest.raises(TenantNotFound, match='"ghost" does not exist'):
            await call()
    assert await store.registry_version() == 0


async def test_update_with_stale_version_conflicts(store: RedisStore) -> None:
    await store.create(tenant_input("acme"))
    body = TenantUpdate.model_validate(
        {"cluster": {"primary": {"host": "db9"}}, "database": "d2", "server_user": "u2"}
    )
    updated = await store.update("acme", body, expected_version=1)
    assert (updated.version, updated.database) == (2, "d2")
    with pytest.raises(VersionConflict) as caught:
        await store.update("acme", body, expected_version=1)
    assert (caught.value.expected, caught.value.current) == (1, 2)
    assert "version 2, not the expected 1" in str(caught.value)
    with pytest.raises(VersionConflict):
        await store.patch("acme", TenantPatch(paused=True), expected_version=1)
    with pytest.raises(VersionConflict):
        await store.delete("acme", expected_version=1)
    after = await store.get("acme")
    assert (after.version, after.paused) == (2, False)
    await store.delete("acme", expected_version=2)
    with pytest.raises(TenantNotFound):
        await store.get("acme")


async def test_every_write_bumps_the_registry_version_once(
    store: RedisStore, redis_server: RedisServer
) -> None:
    writes = [
        lambda: store.create(tenant_input("acme")),
        lambda: store.patch("acme", TenantPatch(database="d2")),
        lambda: store.add_user("acme", UserCreate(name="bob", auth="trust")),
        lambda: store.remove_user("acme", "bob"),
        lambda: store.pause("acme"),
        lambda: store.resume("acme"),
        lambda: store.update(
            "acme",
            TenantUpdate.model_validate(
                {"cluster": {"primary": {"host": "h"}}, "database": "d", "server_user": "u"}
            ),
        ),
        lambda: store.delete("acme"),
    ]
    for expected, write in enumerate(writes, start=1):
        await write()
        assert await store.registry_version() == expected
    client = redis_server.client()
    assert not client.exists("pgrouter:tenant:acme") and not client.smembers("pgrouter:tenants")


async def test_users_and_pause(store: RedisStore) -> None:
    await store.create(tenant_input("acme"))
    tenant = await store.add_user("acme", UserCreate(name="bob", auth="md5", password="b-pw"))
    assert [u.name for u in tenant.users] == ["alice", "bob"] and tenant.version == 2
    replaced = await store.add_user("acme", UserCreate(name="bob", password="new-pw"))
    assert replaced.user("bob").auth == "scram-sha-256"
    assert scram_matches(replaced.user("bob").verifier, "new-pw")
    removed = await store.remove_user("acme", "alice", expected_version=3)
    assert [u.name for u in removed.users] == ["bob"]
    with pytest.raises(UserNotFound, match='no user "alice"'):
        await store.remove_user("acme", "alice")
    assert (await store.pause("acme")).paused is True
    assert (await store.get("acme")).paused is True
    resumed = await store.resume("acme")
    assert (resumed.paused, resumed.version) == (False, 6)


async def test_invalid_patch_writes_nothing(store: RedisStore) -> None:
    await store.create(tenant_input("acme", pool={"size": 4}))
    with pytest.raises(ValidationError, match="min_size"):
        await store.patch("acme", TenantPatch.model_validate({"pool": {"min_size": 9}}))
    assert (await store.get("acme")).version == 1
    assert await store.registry_version() == 1


async def test_concurrent_updates_exactly_one_wins(open_store: Callable[..., RedisStore]) -> None:
    writers = [open_store() for _ in range(10)]  # each its own connections
    await writers[0].create(tenant_input("acme"))
    results = await asyncio.gather(
        *(
            w.patch("acme", TenantPatch(database=f"db{i}"), expected_version=1)
            for i, w in enumerate(writers)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(r, VersionConflict) for r in losers), losers
    final = await writers[0].get("acme")
    assert (final.version, final.database) == (2, winners[0].database)


async def test_concurrent_read_modify_writes_lose_nothing(
    open_store: Callable[..., RedisStore],
) -> None:
    writers = [open_store() for _ in range(8)]
    await writers[0].create(tenant_input("acme", users=[]))
    await asyncio.gather(
        *(w.add_user("acme", UserCreate(name=f"u{i}", auth="trust")) for i, w in enumerate(writers))
    )
    final = await writers[0].get("acme")
    assert sorted(u.name for u in final.users) == [f"u{i}" for i in range(8)]
    assert final.version == 9


async def test_each_write_publishes_its_invalidation(store: RedisStore) -> None:
    async with store.subscribe() as subscription:

        async def next_message() -> Invalidation:
            async with asyncio.timeout(5):
                while (message := await subscription.next(timeout=0.5)) is None:
                    pass
            return message

        await store.create(tenant_input("acme"))
        assert await next_message() == Invalidation("acme", 1, 1)
        await store.pause("acme")
        assert await next_message() == Invalidation("acme", 2, 2)
        with pytest.raises(VersionConflict):
            await store.pause("acme", expected_version=1)  # refused: publishes nothing
        await store.delete("acme")
        assert await next_message() == Invalidation("acme", None, 3, deleted=True)


async def test_tampered_record_fails_closed(store: RedisStore, redis_server: RedisServer) -> None:
    await store.create(tenant_input("acme"))
    record = raw_record(redis_server, "acme")
    ct = bytearray(base64.b64decode(record["server_password"]["ct"]))
    ct[0] ^= 1
    record["server_password"]["ct"] = base64.b64encode(bytes(ct)).decode()
    redis_server.client().set("pgrouter:tenant:acme", json.dumps(record))
    with pytest.raises(RegistryDecryptError, match=r'tenant "acme" \(key id "k1"\)'):
        await store.get("acme")


async def test_wrong_keyring_fails_closed(
    store: RedisStore, open_store: Callable[..., RedisStore]
) -> None:
    await store.create(tenant_input("acme"))
    stranger = open_store(ring=Keyring.from_specs(f"k9:{generate_key()}"))
    with pytest.raises(RegistryDecryptError, match='"acme".*"k1".*unknown key id'):
        await stranger.get("acme")
    impostor = open_store(ring=Keyring.from_specs(f"k1:{generate_key()}"))
    with pytest.raises(RegistryDecryptError, match='"acme".*"k1".*wrong key'):
        await impostor.get("acme")


async def test_rotate_keys(
    store: RedisStore,
    keyring: Keyring,
    key_spec: str,
    open_store: Callable[..., RedisStore],
    redis_server: RedisServer,
) -> None:
    for i in range(4):
        await store.create(tenant_input(f"t{i}", server_password=f"pw-{i}"))
    await store.create(tenant_input("nopw", server_password=None))
    versions = {t.tenant_id: t.version for t in await store.list_tenants()}
    registry_version = await store.registry_version()
    new_spec = f"k2:{generate_key()}"
    rotating = Keyring.from_specs(new_spec, [key_spec])

    assert await store.rotate_keys(rotating) == 4
    assert {raw_record(redis_server, f"t{i}")["server_password"]["kid"] for i in range(4)} == {"k2"}
    assert await store.rotate_keys(rotating) == 0  # idempotent: nothing left under k1
    assert await store.registry_version() == registry_version + 4

    only_new = open_store(ring=Keyring.from_specs(new_spec))  # the old key removed
    tenants = {t.tenant_id: t for t in await only_new.list_tenants()}
    assert {i: tenants[f"t{i}"].server_password.get_secret_value() for i in range(4)} == {
        i: f"pw-{i}" for i in range(4)
    }
    assert {t.tenant_id: t.version for t in tenants.values()} == versions  # content unchanged
    only_old = open_store(ring=keyring)
    with pytest.raises(RegistryDecryptError, match='"k2"'):
        await only_old.get("t0")
    # The rotating store now seals new writes under k2 as well.
    await store.create(tenant_input("later"))
    assert raw_record(redis_server, "later")["server_password"]["kid"] == "k2"


async def test_rotate_keys_without_the_old_key_fails_closed(store: RedisStore) -> None:
    await store.create(tenant_input("acme"))
    with pytest.raises(RegistryDecryptError, match='"acme".*"k1"'):
        await store.rotate_keys(Keyring.from_specs(f"k2:{generate_key()}"))
    assert (await store.get("acme")).server_password.get_secret_value() == "server-secret"


async def test_redis_unreachable(open_store: Callable[..., RedisStore]) -> None:
    nowhere = open_store(url=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    calls = [
        nowhere.ping,
        nowhere.registry_version,
        lambda: nowhere.get("acme"),
        lambda: nowhere.create(tenant_input("acme")),
        lambda: nowhere.delete("acme"),
        nowhere.list_ids,
    ]
    for call in calls:
        with pytest.raises(RegistryUnavailable, match="tenant registry unavailable") as caught:
            await call()
        assert "hunter2" not in str(caught.value)
        assert caught.value.sqlstate == "57P03"


def test_registry_urls_are_checked() -> None:
    keyring = Keyring.from_specs(f"k1:{generate_key()}")
    with pytest.raises(ValueError, match="unsupported registry URL scheme"):
        RedisStore.from_url("http://127.0.0.1:1", keyring)
    with pytest.raises(ValueError, match="service_name"):
        RedisStore.from_url("redis+sentinel://127.0.0.1:26379", keyring)
    with pytest.raises(ValueError, match="host:port"):
        RedisStore.from_url("redis+cluster://127.0.0.1", keyring)


def test_cluster_prefixes_keep_one_hash_slot() -> None:
    assert cluster_prefix(None) == CLUSTER_PREFIX == "{pgrouter}:"
    assert cluster_prefix("app:") == "{app}:"
    assert cluster_prefix("{app}:reg:") == "{app}:reg:"
    assert cluster_prefix("a{}b:") == "{a{}b}:"  # an empty tag does not pin a slot
