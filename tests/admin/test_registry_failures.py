"""The API when the registry fails: Redis gone (a redis-server of the test's own, killed by its
PID; never the session's), and a record this router's keyring cannot decrypt. Both are 503
with a message saying which, never a 500."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from router.registry.crypto import Keyring, generate_key
from router.registry.models import TenantCreate
from router.registry.store import RedisStore
from tests.admin.conftest import AdminAPI, tenant_body, wait_until
from tests.cluster import Cluster
from tests.registry.conftest import RedisServer


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def _registry_state(admin: AdminAPI) -> str:
    return admin.get("/readyz", token=None).json()["registry"]


def test_redis_down_is_503_and_cached_tenants_keep_the_router_ready(
    start_admin: Callable[..., AdminAPI], own_redis: RedisServer, cluster: Cluster
) -> None:
    admin = start_admin(redis_url=own_redis.url)
    assert admin.post("/tenants", json=tenant_body(cluster, "acme")).status_code == 201
    admin.handle.run(admin.router.tenants.cache.get("acme"))  # a login would cache it so

    own_redis.stop()
    wait_until(lambda: "unreachable" in _registry_state(admin), 10, "the cache to notice")
    ready = admin.get("/readyz", token=None)
    assert ready.status_code == 200, ready.text
    assert ready.json()["registry"] == "tenant registry unreachable; serving 1 cached tenants"

    for method, path, body in [
        ("GET", "/tenants", None),
        ("GET", "/tenants/acme", None),
        ("POST", "/tenants", tenant_body(cluster, "beta")),
        ("PATCH", "/tenants/acme", {"paused": True}),
        ("POST", "/tenants/acme/pause", None),
        ("DELETE", "/tenants/acme", None),
        ("GET", "/tenants/beta/status", None),
    ]:
        reply = admin.request(method, path, json=body)
        assert reply.status_code == 503, (method, path, reply.text)
        assert "tenant registry unavailable" in reply.json()["detail"], reply.text

    # The status of a cached tenant still answers, from the cache, and says so.
    status = admin.get("/tenants/acme/status")
    assert status.status_code == 200, status.text
    assert status.json()["record_stale"] is True and status.json()["tenant"]["tenant_id"] == "acme"

    own_redis.start()  # same port: the subscriber reconnects and resynchronises
    wait_until(lambda: _registry_state(admin).startswith("tenant registry connected"), 10, "resync")
    assert admin.post("/tenants", json=tenant_body(cluster, "beta")).status_code == 201


def test_redis_down_with_nothing_cached_is_not_ready(
    start_admin: Callable[..., AdminAPI], own_redis: RedisServer
) -> None:
    admin = start_admin(redis_url=own_redis.url)
    assert admin.get("/readyz", token=None).status_code == 200
    own_redis.stop()
    wait_until(lambda: admin.get("/readyz", token=None).status_code == 503, 10, "not ready")
    assert _registry_state(admin) == "tenant registry unreachable and no tenant cached"
    assert admin.get("/healthz", token=None).status_code == 200


async def _create_under_other_key(admin: AdminAPI, body: dict) -> None:
    settings = admin.router.settings
    foreign = Keyring.from_specs(f"k9:{generate_key()}")
    store = RedisStore.from_url(settings.redis_url, foreign, prefix=settings.registry_prefix)
    try:
        await store.create(TenantCreate.model_validate(body))
    finally:
        await store.close()


def test_a_record_that_cannot_be_decrypted_is_503(admin: AdminAPI, cluster: Cluster) -> None:
    # Written by a router holding a key this one lacks (a rotation half done, say).
    admin.handle.run(_create_under_other_key(admin, tenant_body(cluster, "sealed")))
    for method, path, body in [
        ("GET", "/tenants/sealed", None),
        ("GET", "/tenants", None),
        ("PATCH", "/tenants/sealed", {"paused": True}),
        (
            "PUT",
            "/tenants/sealed",
            {k: v for k, v in tenant_body(cluster).items() if k != "tenant_id"},
        ),
        ("POST", "/tenants/sealed/pause", None),
        ("GET", "/tenants/sealed/status", None),
    ]:
        reply = admin.request(method, path, json=body)
        assert reply.status_code == 503, (method, path, reply.text)
        detail = reply.json()["detail"]
        assert detail.startswith('cannot decrypt the server_password of tenant "sealed"'), detail
        assert 'key id "k9"' in detail
    # The way out: deleting needs no decryption.
    assert admin.delete("/tenants/sealed").status_code == 204
    assert admin.get("/tenants").json() == []
