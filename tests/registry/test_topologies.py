"""The registry URL kinds other than plain redis://, each against real servers started here:
TLS (rediss://), Sentinel (redis+sentinel://) and a one-node Redis Cluster (redis+cluster://).
Each must carry writes, reads and invalidations the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from router.registry.cache import TenantCache
from router.registry.crypto import Keyring
from router.registry.errors import RegistryUnavailable, VersionConflict
from router.registry.models import TenantPatch
from router.registry.store import RedisStore
from tests.registry.conftest import HOST, RedisServer, eventually, tenant_input


async def exercise(url: str, keyring: Keyring) -> RedisStore:
    """CRUD, a version conflict and an invalidation seen by a second cache, through ``url``.
    Returns the (still open) writing store."""
    writer = RedisStore.from_url(url, keyring)
    reader = RedisStore.from_url(url, keyring)
    cache = TenantCache(reader)
    cache.start()
    try:
        await cache.wait_synced(5)
        await writer.create(tenant_input("acme"))
        assert (await cache.get("acme")).version == 1
        await writer.patch("acme", TenantPatch(paused=True), expected_version=1)
        with pytest.raises(VersionConflict):
            await writer.patch("acme", TenantPatch(paused=False), expected_version=1)

        async def cache_sees_pause() -> bool:
            return (await cache.get("acme")).paused

        await eventually(cache_sees_pause, 1.0, "the cache sees the pause")
        assert await writer.list_ids() == ["acme"]
        assert await writer.registry_version() == 2
        return writer
    finally:
        await cache.stop()
        await reader.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    paths = tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca.crt"
    cert.cert_chain_pems[0].write_to_path(paths[0])
    cert.private_key_pem.write_to_path(paths[1])
    ca.cert_pem.write_to_path(paths[2])
    return paths


async def test_tls(tmp_path: Path, tls_files: tuple[Path, Path, Path], keyring: Keyring) -> None:
    server = RedisServer(tmp_path, tls=tls_files).start()
    try:
        writer = await exercise(server.url, keyring)
        await writer.close()
        # Without the CA the server's certificate is not trusted: no plaintext fallback.
        untrusting = RedisStore.from_url(f"rediss://{HOST}:{server.port}/0", keyring)
        with pytest.raises(RegistryUnavailable):
            await untrusting.ping()
        await untrusting.close()
    finally:
        server.stop()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    (tmp_path / "master").mkdir()
    (tmp_path / "sentinel").mkdir()
    master = RedisServer(tmp_path / "master").start()
    monitor = f"sentinel monitor registry {HOST} {master.port} 1\n"
    watcher = RedisServer(tmp_path / "sentinel", "--sentinel", config=monitor)
    try:
        watcher.start()
        yield master, watcher
    finally:
        watcher.stop()
        master.stop()


async def test_sentinel(sentinel: tuple[RedisServer, RedisServer], keyring: Keyring) -> None:
    master, watcher = sentinel
    url = f"redis+sentinel://{HOST}:{watcher.port},{HOST}:1/registry"  # one sentinel down
    writer = await exercise(url, keyring)
    await writer.close()
    assert master.client().exists("pgrouter:tenant:acme")  # it found the master through it
    unknown = RedisStore.from_url(f"redis+sentinel://{HOST}:{watcher.port}/nosuch", keyring)
    with pytest.raises(RegistryUnavailable, match="nosuch"):
        await unknown.ping()
    await unknown.close()


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[RedisServer]:
    node = RedisServer(
        tmp_path, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"
    ).start()
    try:
        client = node.client()
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while client.cluster("info")["cluster_state"] != "ok":
            assert time.monotonic() < deadline, "the one-node cluster did not come up"
            time.sleep(0.05)
        yield node
    finally:
        node.stop()


async def test_cluster(cluster_node: RedisServer, keyring: Keyring) -> None:
    url = f"redis+cluster://{HOST}:{cluster_node.port}"
    writer = await exercise(url, keyring)
    assert writer.prefix == "{pgrouter}:"
    await writer.close()
    client = cluster_node.client()
    keys = sorted(client.keys("*"))
    assert keys == ["{pgrouter}:tenant:acme", "{pgrouter}:tenants", "{pgrouter}:version"]
    assert len({client.cluster("keyslot", key) for key in keys}) == 1


async def test_sentinel_and_cluster_down_are_unavailable(keyring: Keyring) -> None:
    for url in (f"redis+sentinel://{HOST}:1/registry", f"redis+cluster://{HOST}:1"):
        store = RedisStore.from_url(url, keyring, connect_timeout=0.5)
        with pytest.raises(RegistryUnavailable, match="tenant registry unavailable"):
            await asyncio.wait_for(store.get("acme"), 10)
        await store.close()
