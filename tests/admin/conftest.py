"""Fixtures of the admin API tests: a real router (tests/harness.RouterThread) with a tenant
registry in the session's real Redis, each test under a registry prefix of its own, and its
admin API listening on a free port; an HTTP client for it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from router.admin.server import AdminServer
from router.registry.crypto import generate_key
from tests.cluster import Cluster
from tests.harness import RouterThread

ADMIN_TOKEN = "admin-token-for-tests"
# Passwords the tests send; no response may contain them (nor the verifiers derived from them).
SERVER_PASSWORD = "scram-pw"  # pgr_scram's password on the test cluster (tests/cluster.py)
CLIENT_PASSWORD = "alice-secret-pw"


class AdminAPI:
    """A running router, its admin API, and a client for that API."""

    def __init__(self, handle: RouterThread, server: AdminServer, token: str | None) -> None:
        self.handle = handle
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}"
        self.token = token
        self.http = httpx.Client(base_url=self.url, timeout=30.0)
        self.responses: list[httpx.Response] = []  # every reply, for the no-secrets checks

    @property
    def router(self):
        return self.handle.router

    def request(
        self, method: str, path: str, *, token: str | None = ..., **kwargs: Any
    ) -> httpx.Response:
        """``token``: the bearer token to send (default: the router's; None: no header)."""
        token = self.token if token is ... else token
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = self.http.request(method, path, headers=headers, **kwargs)
        self.responses.append(response)
        return response

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    def close(self) -> None:
        self.http.close()


def registry_settings(redis_url: str) -> dict[str, Any]:
    """Settings of a router on ``redis_url`` under a registry prefix no other test uses."""
    return {
        "redis_url": redis_url,
        "secret_key": f"k1:{generate_key()}",
        "registry_prefix": f"admin-test-{uuid.uuid4().hex[:12]}:",
        "admin_port": 0,
        "admin_host": "127.0.0.1",
        "admin_token": ADMIN_TOKEN,
        "tenant_drop_timeout": 5.0,
    }


@pytest.fixture
def start_admin(
    cluster: Cluster, start_router: Callable[..., RouterThread]
) -> Iterator[Callable[..., AdminAPI]]:
    """Start a router with its admin API; keyword arguments override the settings (redis_url
    None: no registry). Registry, token and port default to registry_settings()."""
    started: list[AdminAPI] = []

    def start(**overrides: Any) -> AdminAPI:
        settings = registry_settings(cluster.redis_url)
        settings.update(overrides)
        handle = start_router(**settings)
        assert handle.router.admin is not None, "Router.start() did not start the admin API"
        api = AdminAPI(handle, handle.router.admin, settings["admin_token"])
        started.append(api)
        return api

    yield start
    for api in started:
        api.close()


@pytest.fixture
def admin(start_admin: Callable[..., AdminAPI]) -> AdminAPI:
    return start_admin()


def tenant_body(pg: Cluster, tenant_id: str | None = None, /, **overrides: Any) -> dict[str, Any]:
    """A POST /tenants body: database ``app`` on the test cluster's primary, logged into as
    pgr_scram, with one SCRAM client login alice."""
    body: dict[str, Any] = {
        "tenant_id": tenant_id or f"t-{uuid.uuid4().hex[:10]}",
        "cluster": {"primary": {"host": pg.primary.host, "port": pg.primary.port}},
        "database": "app",
        "server_user": "pgr_scram",
        "server_password": SERVER_PASSWORD,
        "users": [{"name": "alice", "password": CLIENT_PASSWORD}],
    }
    body.update(overrides)
    return body


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until true; fail after ``timeout`` s (polling, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.02)
