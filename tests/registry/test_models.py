"""Tenant records and the API's input models: what is accepted, what is refused and which
field the refusal names, and that no plaintext client password survives into a record."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from router.protocol.auth import md5_hash
from router.registry.models import (
    FALLBACK_TENANT_ID,
    Tenant,
    TenantCreate,
    TenantPatch,
    TenantUpdate,
    UserCreate,
)
from tests.registry.conftest import scram_matches, tenant_input, verifier

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tenant_id": "acme",
        "cluster": {"primary": {"host": "db1", "port": 5432}},
        "database": "acme",
        "server_user": "owner",
    }
    data.update(overrides)
    return data


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("upper-case id", base(tenant_id="Acme"), "tenant_id"),
    ("empty id", base(tenant_id=""), "tenant_id"),
    ("64-character id", base(tenant_id="a" * 64), "tenant_id"),
    ("id with a space", base(tenant_id="a b"), "tenant_id"),
    ("id with a dot", base(tenant_id="a.b"), "tenant_id"),
    ("two stars", base(tenant_id="**"), "tenant_id"),
    ("unknown mode", base(mode="hybrid"), "mode"),
    ("shared without tenant_key", base(mode="shared"), "tenant_key"),
    ("tenant_key not a UUID", base(mode="shared", tenant_key="nope"), "tenant_key"),
    ("no cluster", {k: v for k, v in base().items() if k != "cluster"}, "cluster"),
    ("no primary", base(cluster={"replicas": []}), "primary"),
    ("port out of range", base(cluster={"primary": {"host": "h", "port": 70000}}), "port"),
    ("unknown tls mode", base(cluster={"primary": {"host": "h"}, "tls": "maybe"}), "tls"),
    (
        "verify-full without a CA",
        base(cluster={"primary": {"host": "h"}, "tls": "verify-full"}),
        "tls_ca",
    ),
    ("empty database", base(database=""), "database"),
    ("64-character server_user", base(server_user="u" * 64), "server_user"),
    ("unknown auth", base(users=[{"name": "a", "auth": "password", "password": "x"}]), "auth"),
    ("scram user with no secret", base(users=[{"name": "a"}]), "password"),
    (
        "password and verifier",
        base(users=[{"name": "a", "password": "x", "verifier": verifier()}]),
        "verifier",
    ),
    ("trust user with a password", base(users=[{"name": "a", "auth": "trust", "password": "x"}]), "password"),
    ("scram verifier that is not one", base(users=[{"name": "a", "verifier": "SCRAM-SHA-256$1"}]), "verifier"),
    ("md5 verifier that is not one", base(users=[{"name": "a", "auth": "md5", "verifier": "md5xyz"}]), "verifier"),
    ("empty password", base(users=[{"name": "a", "password": ""}]), "password"),
    ("empty user name", base(users=[{"name": "", "password": "x"}]), "name"),
    (
        "duplicate user names",
        base(users=[{"name": "a", "password": "x"}, {"name": "a", "password": "y"}]),
        "users",
    ),
    ("auth_query with users", base(auth_query=True, users=[{"name": "a", "password": "x"}]), "auth_query"),
    ("pool size 0", base(pool={"size": 0}), "size"),
    ("min_size above size", base(pool={"size": 2, "min_size": 3}), "min_size"),
    ("unknown pool mode", base(pool={"mode": "statement"}), "mode"),
    ("max_client_conn 0", base(limits={"max_client_conn": 0}), "max_client_conn"),
    ("negative query_wait_timeout", base(limits={"query_wait_timeout": -1}), "query_wait_timeout"),
    ("negative max_replica_lag", base(limits={"max_replica_lag": -0.5}), "max_replica_lag"),
    ("negative max_replica_lag_bytes", base(limits={"max_replica_lag_bytes": -1}), "max_replica_lag_bytes"),
    ("statements_per_second 0", base(limits={"statements_per_second": 0}), "statements_per_second"),
    ("unknown replica_fallback", base(limits={"replica_fallback": "replica"}), "replica_fallback"),
    ("unknown replica_affinity", base(limits={"replica_affinity": "sticky"}), "replica_affinity"),
    ("unknown read_your_writes", base(limits={"read_your_writes": "always"}), "read_your_writes"),
    ("max_db_connections 0", base(limits={"max_db_connections": 0}), "max_db_connections"),
    ("negative pool.reserve_size", base(pool={"reserve_size": -1}), "reserve_size"),
    ("allowed_cidrs with host bits", base(limits={"allowed_cidrs": ["10.0.0.1/8"]}), "allowed_cidrs"),
    ("allowed_cidrs not a network", base(limits={"allowed_cidrs": ["db.example.com"]}), "allowed_cidrs"),
    ("allowed_cidrs not a list", base(limits={"allowed_cidrs": "10.0.0.0/8"}), "allowed_cidrs"),
    ("unknown top-level field", base(colour="blue"), "colour"),
    ("unknown nested field", base(pool={"colour": "blue"}), "colour"),
    ("unknown user field", base(users=[{"name": "a", "password": "x", "role": "admin"}]), "role"),
    ("version is not an input", base(version=3), "version"),
    ("created_at is not an input", base(created_at=NOW.isoformat()), "created_at"),
]  # fmt: skip


def named_fields(exc: ValidationError) -> str:
    return " | ".join(
        ".".join(str(part) for part in error["loc"]) + ": " + error["msg"] for error in exc.errors()
    )


@pytest.mark.parametrize(("case", "data", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_naming_the_field(case: str, data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TenantCreate.model_validate(data)
    errors = caught.value.errors()
    assert any(
        field in [str(part) for part in error["loc"]] or field in error["msg"] for error in errors
    ), f"{case}: no error names {field!r}: {named_fields(caught.value)}"


def test_each_bad_input_differs_from_a_good_one_only_there() -> None:
    # The table's base is valid: every refusal above comes from the one thing each row changed.
    TenantCreate.model_validate(base())


def test_create_turns_passwords_into_verifiers() -> None:
    body = TenantCreate.model_validate(
        base(
            users=[
                {"name": "alice", "password": "alice-pw"},
                {"name": "bob", "auth": "md5", "password": "bob-pw"},
                {"name": "carol", "auth": "trust"},
                {"name": "dave", "verifier": verifier()},
            ]
        )
    )
    tenant = body.to_tenant(NOW)
    alice, bob, carol, dave = tenant.users
    assert scram_matches(alice.verifier, "alice-pw")
    assert not scram_matches(alice.verifier, "wrong")
    assert bob.verifier == md5_hash("bob", "bob-pw")
    assert carol.verifier is None
    assert dave.verifier == verifier()
    text = tenant.model_dump_json()
    assert "alice-pw" not in text and "bob-pw" not in text
    assert (tenant.version, tenant.created_at, tenant.updated_at) == (1, NOW, NOW)
    assert tenant.user("bob") is bob and tenant.user("nobody") is None


def test_server_password_is_plaintext_in_memory_but_never_printed() -> None:
    tenant = tenant_input("acme", server_password="s3cret-pw").to_tenant(NOW)
    assert tenant.server_password.get_secret_value() == "s3cret-pw"
    assert "s3cret-pw" not in repr(tenant)
    assert "s3cret-pw" not in tenant.model_dump_json()


def test_stored_user_refuses_a_plaintext_password() -> None:
    record = tenant_input("acme").to_tenant(NOW).model_dump()
    record["users"] = [{"name": "eve", "password": "plain"}]
    with pytest.raises(ValidationError) as caught:
        Tenant.model_validate(record)
    assert "password" in named_fields(caught.value)
    record["users"] = [{"name": "eve", "auth": "scram-sha-256"}]
    with pytest.raises(ValidationError, match="verifier"):
        Tenant.model_validate(record)


def test_fallback_and_shared_tenants() -> None:
    key = uuid.uuid4()
    tenant = TenantCreate.model_validate(
        base(tenant_id=FALLBACK_TENANT_ID, mode="shared", tenant_key=str(key))
    ).to_tenant(NOW)
    assert tenant.tenant_id == "*" and tenant.tenant_key == key


def test_tenant_is_immutable() -> None:
    tenant = tenant_input("acme").to_tenant(NOW)
    with pytest.raises(ValidationError):
        tenant.paused = True  # type: ignore[misc]


def test_update_replaces_everything_but_identity() -> None:
    current = tenant_input("acme", paused=True, pool={"size": 7}).to_tenant(NOW)
    later = NOW + timedelta(minutes=5)
    body = TenantUpdate.model_validate(
        {
            "cluster": {"primary": {"host": "db9"}},
            "database": "acme2",
            "server_user": "owner2",
            "users": [{"name": "zed", "password": "zed-pw"}],
        }
    )
    updated = body.apply(current, later)
    assert updated.tenant_id == "acme"
    assert (updated.version, updated.created_at, updated.updated_at) == (2, NOW, later)
    assert updated.cluster.primary.host == "db9" and updated.database == "acme2"
    # Full replace: what the body leaves out returns to its default.
    assert updated.paused is False and updated.pool.size == 20
    assert updated.server_password is None
    assert [u.name for u in updated.users] == ["zed"] and scram_matches(
        updated.users[0].verifier, "zed-pw"
    )


def test_patch_changes_only_what_it_names() -> None:
    current = tenant_input("acme", limits={"statements_per_second": 50}).to_tenant(NOW)
    later = NOW + timedelta(minutes=1)
    patched = TenantPatch.model_validate(
        {
            "pool": {"size": 5},
            "cluster": {"tls": "require"},
            "limits": {"statements_per_second": None},
            "paused": True,
        }
    ).apply(current, later)
    assert patched.pool.size == 5 and patched.pool.mode == current.pool.mode
    assert patched.cluster.tls == "require" and patched.cluster.primary == current.cluster.primary
    assert patched.cluster.replicas == current.cluster.replicas
    assert patched.limits.statements_per_second is None
    assert (patched.limits.replica_fallback, patched.limits.replica_affinity) == ("primary", "transaction")
    assert patched.limits.read_your_writes is None  # the global setting
    assert patched.limits.max_client_conn == current.limits.max_client_conn
    assert patched.paused is True
    assert patched.users == current.users and patched.server_password == current.server_password
    assert (patched.version, patched.created_at, patched.updated_at) == (2, NOW, later)


def test_patch_sets_and_clears_secrets_and_users() -> None:
    current = tenant_input("acme").to_tenant(NOW)
    patched = TenantPatch.model_validate(
        {
            "server_password": "new-secret",
            "users": [{"name": "bob", "auth": "md5", "password": "b"}],
        }
    ).apply(current, NOW)
    assert patched.server_password.get_secret_value() == "new-secret"
    assert [(u.name, u.verifier) for u in patched.users] == [("bob", md5_hash("bob", "b"))]
    cleared = TenantPatch.model_validate({"server_password": None}).apply(patched, NOW)
    assert cleared.server_password is None


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"database": None}, "database"),
        ({"pool": {"size": None}}, "size"),
        ({"cluster": {"primary": None}}, "primary"),
        ({"paused": None}, "paused"),
        ({"limits": {"replica_fallback": None}}, "replica_fallback"),
        ({"limits": {"replica_affinity": None}}, "replica_affinity"),
        ({"version": 9}, "version"),
        ({"tenant_id": "other"}, "tenant_id"),
        ({"pool": {"size": 0}}, "size"),
    ],
)
def test_patch_refuses_nulls_and_identity(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TenantPatch.model_validate(patch)
    assert field in named_fields(caught.value)


def test_patch_checks_the_result_as_a_whole() -> None:
    current = tenant_input("acme", pool={"size": 4}).to_tenant(NOW)
    patch = TenantPatch.model_validate({"pool": {"min_size": 10}})  # fine on its own
    with pytest.raises(ValidationError) as caught:
        patch.apply(current, NOW)
    assert "min_size" in named_fields(caught.value)
    to_shared = TenantPatch.model_validate({"mode": "shared"})
    with pytest.raises(ValidationError, match="tenant_key"):
        to_shared.apply(current, NOW)


def test_user_create_takes_a_ready_verifier() -> None:
    user = UserCreate(name="x", auth="md5", verifier=md5_hash("x", "pw")).to_user()
    assert user.verifier == md5_hash("x", "pw")
    scram = UserCreate(name="y", verifier=verifier()).to_user()
    assert scram.verifier == verifier()


@pytest.mark.parametrize(
    ("cidrs", "address", "allowed"),
    [
        ([], "203.0.113.9", True),  # no list: any address
        ([], None, True),
        (["10.0.0.0/8"], "10.200.1.2", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["10.0.0.0/8", "192.168.1.7/32"], "192.168.1.7", True),
        (["10.0.0.0/8"], "::ffff:10.1.1.1", True),  # an IPv4 client on a dual-stack listener
        (["2001:db8::/32"], "2001:db8:1::5", True),
        (["2001:db8::/32"], "2001:db9::5", False),
        (["10.0.0.0/8"], None, False),  # no IP address (a Unix socket): only an empty list admits it
        (["10.0.0.0/8"], "not an address", False),
    ],
)
def test_allowed_cidrs(cidrs: list[str], address: str | None, allowed: bool) -> None:
    limits = tenant_input("acme", limits={"allowed_cidrs": cidrs}).to_tenant(NOW).limits
    assert limits.allows(address) is allowed


def test_allowed_cidrs_patch_sets_and_clears() -> None:
    current = tenant_input("acme").to_tenant(NOW)
    narrowed = TenantPatch.model_validate({"limits": {"allowed_cidrs": ["10.0.0.0/8"]}}).apply(current, NOW)
    assert [str(n) for n in narrowed.limits.allowed_cidrs] == ["10.0.0.0/8"]
    assert narrowed.limits.max_client_conn == current.limits.max_client_conn
    assert TenantPatch.model_validate({"limits": {"allowed_cidrs": []}}).apply(narrowed, NOW).limits.allowed_cidrs == []
    with pytest.raises(ValidationError, match="allowed_cidrs"):
        TenantPatch.model_validate({"limits": {"allowed_cidrs": None}})
    stored = narrowed.model_dump(mode="json")["limits"]["allowed_cidrs"]
    assert stored == ["10.0.0.0/8"]  # as the store and the API write it
