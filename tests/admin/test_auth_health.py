"""Who may call what: the bearer token on every tenant route, the open health routes, /metrics
open or not by metrics_public, and /readyz's answer on a healthy router."""

from __future__ import annotations

from collections.abc import Callable

from tests.admin.conftest import ADMIN_TOKEN, AdminAPI


def _tenant_operations(admin: AdminAPI) -> list[tuple[str, str]]:
    """Every operation under /tenants, and /queries, from the API's own OpenAPI document."""
    schema = admin.get("/openapi.json", token=None).json()
    operations = [
        (method.upper(), path.replace("{tenant_id}", "acme").replace("{name}", "alice"))
        for path, item in schema["paths"].items()
        if path.startswith(("/tenants", "/queries"))
        for method in item
    ]
    assert len(operations) == 14, operations  # list, create, get/put/patch/delete, users x2,
    return operations  # pause, resume, move, status, queries of one tenant and of all


def test_every_tenant_route_needs_the_token(admin: AdminAPI) -> None:
    for method, path in _tenant_operations(admin):
        missing = admin.request(method, path, token=None, json={})
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = admin.request(method, path, token=ADMIN_TOKEN + "x", json={})
        assert wrong.status_code == 401, (method, path)
        assert "invalid_token" in wrong.headers["WWW-Authenticate"]
        basic = admin.request(
            method, path, token=None, json={}, headers={"Authorization": "Basic YTpi"}
        )
        assert basic.status_code == 401, (method, path)
    assert admin.get("/tenants", token=ADMIN_TOKEN[:-1]).status_code == 401  # a prefix is not it
    assert admin.get("/tenants").status_code == 200


def test_without_a_configured_token_tenant_routes_refuse_everyone(
    start_admin: Callable[..., AdminAPI],
) -> None:
    admin = start_admin(admin_token=None)
    for method, path in _tenant_operations(admin):
        for token in (None, "anything", ADMIN_TOKEN):
            reply = admin.request(method, path, token=token, json={})
            assert reply.status_code == 403, (method, path, token)
            assert "no admin_token" in reply.json()["detail"], (method, path)
    assert admin.get("/healthz", token=None).status_code == 200


def test_health_routes_are_open(admin: AdminAPI) -> None:
    health = admin.get("/healthz", token=None)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = admin.get("/readyz", token=None)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True
    assert body["listener"] == f"listening on 127.0.0.1:{admin.handle.port}"
    assert body["registry"].startswith("tenant registry connected")
    schema = admin.get("/openapi.json", token=None)
    assert schema.status_code == 200
    assert schema.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_readyz_without_a_registry(start_admin: Callable[..., AdminAPI]) -> None:
    admin = start_admin(redis_url=None, secret_key=None)
    ready = admin.get("/readyz", token=None)
    assert ready.status_code == 200
    assert ready.json()["registry"] == "no tenant registry configured"
    tenants = admin.get("/tenants")
    assert tenants.status_code == 503
    assert "not configured" in tenants.json()["detail"]


def test_readyz_is_503_while_draining(admin: AdminAPI) -> None:
    assert admin.handle.run(admin.router.drain(timeout=1.0)) is True
    ready = admin.get("/readyz", token=None)
    assert ready.status_code == 503
    assert ready.json()["ready"] is False and ready.json()["listener"].startswith("draining")
    assert admin.get("/healthz", token=None).status_code == 200  # alive all the same


def test_metrics_public_or_behind_the_token(start_admin: Callable[..., AdminAPI]) -> None:
    public = start_admin()
    assert public.get("/metrics", token=None).status_code == 200
    private = start_admin(metrics_public=False)
    assert private.get("/metrics", token=None).status_code == 401
    assert private.get("/metrics", token="wrong").status_code == 401
    scrape = private.get("/metrics")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    assert "pgrouter_client_connections" in scrape.text
