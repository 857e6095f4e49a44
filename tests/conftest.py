"""Fixtures shared by every test layer: one real cluster per session (a primary, two
streaming replicas and a redis-server, from the local binaries), and routers built from
settings objects."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from router.config import Settings
from router.protocol.auth import md5_hash, scram_verifier
from tests.cluster import Cluster
from tests.harness import RouterProcess, RouterThread, write_toml

# Client logins the test routers accept: name -> (auth method, password).
CLIENT_USERS = {
    "alice": ("scram-sha-256", "alice-pw"),
    "bob": ("md5", "bob-pw"),
    "carol": ("trust", None),
}


def users_config() -> dict[str, dict[str, str]]:
    users = {}
    for name, (method, password) in CLIENT_USERS.items():
        if method == "scram-sha-256":
            users[name] = {"auth": method, "password": scram_verifier(password)}
        elif method == "md5":
            users[name] = {"auth": method, "password": md5_hash(name, password)}
        else:
            users[name] = {"auth": method}
    return users


def router_config(cluster: Cluster, *, split: bool = False, **overrides: Any) -> dict[str, Any]:
    """A configuration dict: database `app` on the test cluster, pooled as postgres. Only
    the primary unless ``split``: then both replicas too, with read/write splitting."""
    config: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "pool_size": 4,
        "query_wait_timeout": 10.0,
        "admin_port": -1,  # tests that use the admin API ask for port 0
        "clusters": {
            "main": {
                "primary": {"host": cluster.primary.host, "port": cluster.primary.port},
                "replicas": [{"host": r.host, "port": r.port} for r in cluster.replicas] if split else [],
            }
        },
        "databases": {"app": {"cluster": "main", "server_user": "postgres"}},
        "users": users_config(),
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster"), replicas=2, redis=True, ssl=True) as c:
        yield c


@pytest.fixture
def start_router(cluster: Cluster) -> Iterator[Callable[..., RouterThread]]:
    """Start an in-process router; keyword arguments override the configuration."""
    started: list[RouterThread] = []

    def start(**overrides: Any) -> RouterThread:
        handle = RouterThread(Settings(**router_config(cluster, **overrides))).start()
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def router(start_router: Callable[..., RouterThread]) -> RouterThread:
    return start_router()


@pytest.fixture
def router_process(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., RouterProcess]]:
    """Start `pgrouter run` as a subprocess from a configuration file."""
    started: list[RouterProcess] = []

    def start(**overrides: Any) -> RouterProcess:
        path = write_toml(tmp_path / f"router{len(started)}.toml", router_config(cluster, **overrides))
        proc = RouterProcess(path).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def client_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with ca.pem and the router's client-side cert.pem/key.pem (trustme), for
    127.0.0.1, localhost and any host under db.test (tenant_sni_suffix tests)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "*.db.test", "*.other.db.test")
    d = tmp_path_factory.mktemp("client-tls")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    return d
