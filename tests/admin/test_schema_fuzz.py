"""Property-based: schemathesis generates requests from the live API's own /openapi.json, valid
ones and invalid ones, for every tenant operation; none may be answered with a 5xx (the registry
is up, so even a 503 would be a bug, and provisioning, the one 502, is switched off below).

Every other case that names a tenant names one that exists, so the write paths run, not only
their 404s. (schemathesis's own pytest loader does not work with this pytest; its strategies
are driven with hypothesis directly.)
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from schemathesis.transport.prepare import get_exclude_headers

from router.admin.app import create_app
from router.app import Router
from router.config import Settings
from router.registry.models import ClusterPatch, LimitsPatch, PoolPatch, TenantPatch
from tests.admin.conftest import ADMIN_TOKEN, AdminAPI, tenant_body
from tests.cluster import Cluster

EXISTING = "acme"
MAX_EXAMPLES = 30  # per operation and generation mode: the whole file runs in well under a minute

# PATCH fields the OpenAPI document calls nullable (absent and null share one Python default)
# though null is refused except where it clears a value: dropping those nulls from positive
# cases lets them reach the store instead of all ending in the same 422.
_PATCH_MODELS = {"cluster": ClusterPatch, "pool": PoolPatch, "limits": LimitsPatch}


def _drop_refused_nulls(body: dict, model: type = TenantPatch) -> None:
    for name, value in list(body.items()):
        if value is None and name not in model.nullable:
            del body[name]
        elif isinstance(value, dict) and model is TenantPatch and name in _PATCH_MODELS:
            _drop_refused_nulls(value, _PATCH_MODELS[name])


OPERATIONS = [
    (method.upper(), path)
    for path, item in create_app(Router(Settings(admin_port=-1))).openapi()["paths"].items()
    if path.startswith("/tenants")
    for method in item
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors(admin: AdminAPI, cluster: Cluster, method: str, path: str) -> None:
    schema = schemathesis.openapi.from_url(f"{admin.url}/openapi.json")
    operation = schema[path][method]
    existing = itertools.cycle([True, False])
    strategy = operation.as_strategy(schemathesis.GenerationMode.POSITIVE) | operation.as_strategy(
        schemathesis.GenerationMode.NEGATIVE
    )

    @settings(
        max_examples=2 * MAX_EXAMPLES,
        deadline=None,
        derandomize=True,  # the same examples every run: a failure here reproduces
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=strategy)
    def no_server_error(case) -> None:
        # Provisioning would connect to whatever host the generator made up: never from here.
        for where in (case.body, case.query):
            if isinstance(where, dict):
                where.pop("provision", None)
                where.pop("provision_role", None)
        if case.method == "PATCH" and isinstance(case.body, dict):
            _drop_refused_nulls(case.body)
        if case.path_parameters and "tenant_id" in case.path_parameters and next(existing):
            case.path_parameters["tenant_id"] = EXISTING
            admin.post("/tenants", json=tenant_body(cluster, EXISTING))  # 409 when it exists
        # Negative cases that drop the token test only the auth layer (test_auth_health.py).
        assume("Authorization" not in get_exclude_headers(case))
        case.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"  # others may garble it
        response = case.call(timeout=30)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
            f"\nbody: {case.body!r}\nquery: {case.query!r}\nheaders: {case.headers!r}"
        )

    no_server_error()
