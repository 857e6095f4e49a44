"""The /tenants endpoints against a real router and the session's real Redis: every endpoint's
happy path, its error statuses, optimistic concurrency, and that no reply carries a secret."""

from __future__ import annotations

from router.admin.views import MASK
from router.protocol.auth import md5_hash, scram_verifier
from tests.admin.conftest import (
    CLIENT_PASSWORD,
    SERVER_PASSWORD,
    AdminAPI,
    tenant_body,
)
from tests.cluster import Cluster


def test_create_get_list(admin: AdminAPI, cluster: Cluster) -> None:
    body = tenant_body(cluster, "acme", limits={"max_replica_lag": 2.5})
    created = admin.post("/tenants", json=body)
    assert created.status_code == 201, created.text
    record = created.json()
    assert record["tenant_id"] == "acme" and record["version"] == 1
    assert record["limits"]["max_replica_lag"] == 2.5
    assert created.headers["ETag"] == '"1"'
    assert created.headers["Location"] == "/tenants/acme"
    assert record["server_password"] == MASK
    assert record["users"] == [{"name": "alice", "auth": "scram-sha-256", "verifier": MASK}]

    got = admin.get("/tenants/acme")
    assert got.status_code == 200 and got.json() == record
    assert got.headers["ETag"] == '"1"'

    admin.post("/tenants", json=tenant_body(cluster, "beta", server_password=None))
    listed = admin.get("/tenants")
    assert listed.status_code == 200
    assert [t["tenant_id"] for t in listed.json()] == ["acme", "beta"]
    assert listed.json()[1]["server_password"] is None  # none set: null, not the mask


def test_put_replaces_and_honours_if_match(admin: AdminAPI, cluster: Cluster) -> None:
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    replacement = tenant_body(cluster, pool={"size": 7}, users=[])
    del replacement["tenant_id"]  # PUT takes everything but the identity

    stale = admin.put("/tenants/acme", json=replacement, headers={"If-Match": '"7"'})
    assert stale.status_code == 412
    assert "version 1" in stale.json()["detail"]

    replaced = admin.put("/tenants/acme", json=replacement, headers={"If-Match": '"1"'})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["version"] == 2 and replaced.json()["pool"]["size"] == 7
    assert replaced.json()["users"] == []
    assert replaced.headers["ETag"] == '"2"'
    # Without If-Match a write applies to the current version; W/"n" and bare n are accepted.
    assert admin.put("/tenants/acme", json=replacement).json()["version"] == 3
    assert (
        admin.put("/tenants/acme", json=replacement, headers={"If-Match": 'W/"3"'}).status_code
        == 200
    )
    assert (
        admin.put("/tenants/acme", json=replacement, headers={"If-Match": "3"}).status_code == 412
    )
    malformed = admin.put("/tenants/acme", json=replacement, headers={"If-Match": "v3"})
    assert malformed.status_code == 422 and malformed.json()["detail"][0]["loc"] == [
        "header",
        "If-Match",
    ]
    assert admin.put("/tenants/nope", json=replacement).status_code == 404


def test_patch_merges_and_honours_if_match(admin: AdminAPI, cluster: Cluster) -> None:
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    patched = admin.patch(
        "/tenants/acme", json={"pool": {"size": 9}, "server_password": None},
        headers={"If-Match": '"1"'},
    )  # fmt: skip
    assert patched.status_code == 200, patched.text
    record = patched.json()
    assert record["pool"]["size"] == 9 and record["pool"]["mode"] == "transaction"
    assert record["server_password"] is None and record["version"] == 2
    assert record["users"][0]["name"] == "alice"  # untouched

    assert (
        admin.patch("/tenants/acme", json={"paused": True}, headers={"If-Match": '"1"'}).status_code
        == 412
    )
    # A patch valid alone whose result breaks a rule spanning fields: 422 naming it.
    crossing = admin.patch("/tenants/acme", json={"pool": {"min_size": 50}})
    assert crossing.status_code == 422
    assert "min_size" in crossing.text
    assert admin.patch("/tenants/nope", json={"paused": True}).status_code == 404


def test_users_add_replace_remove(admin: AdminAPI, cluster: Cluster) -> None:
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    added = admin.post(
        "/tenants/acme/users", json={"name": "bob", "auth": "md5", "password": "bob-pw"}
    )
    assert added.status_code == 200, added.text
    assert [(u["name"], u["auth"]) for u in added.json()["users"]] == [
        ("alice", "scram-sha-256"),
        ("bob", "md5"),
    ]
    assert added.json()["version"] == 2
    stored = admin.handle.run(admin.router.tenants.store.get("acme"))
    assert stored.user("bob").verifier == md5_hash("bob", "bob-pw")  # hashed as md5 logins are
    trust = admin.post("/tenants/acme/users", json={"name": "carol", "auth": "trust"})
    assert trust.json()["users"][-1] == {"name": "carol", "auth": "trust", "verifier": None}

    removed = admin.delete("/tenants/acme/users/bob", headers={"If-Match": '"3"'})
    assert removed.status_code == 200, removed.text
    assert [u["name"] for u in removed.json()["users"]] == ["alice", "carol"]
    assert admin.delete("/tenants/acme/users/bob").status_code == 404
    assert admin.delete("/tenants/nope/users/alice").status_code == 404
    assert admin.post("/tenants/nope/users", json={"name": "x", "auth": "trust"}).status_code == 404
    assert admin.delete("/tenants/acme/users/alice", headers={"If-Match": '"1"'}).status_code == 412


def test_pause_and_resume_apply_on_this_instance_at_once(admin: AdminAPI, cluster: Cluster) -> None:
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    # Nothing cached the tenant here, so only the API's own apply() can close the gate: no
    # invalidation reaches the TenantManager for a tenant its cache does not hold.
    paused = admin.post("/tenants/acme/pause")
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert admin.handle.call(lambda r: "acme" in r.tenants.gates)
    assert admin.get("/tenants/acme/status").json()["paused"] is True

    resumed = admin.post("/tenants/acme/resume", headers={"If-Match": '"2"'})
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    assert admin.handle.call(lambda r: "acme" not in r.tenants.gates)
    assert admin.post("/tenants/acme/pause", headers={"If-Match": '"2"'}).status_code == 412
    assert admin.post("/tenants/nope/pause").status_code == 404
    assert admin.post("/tenants/nope/resume").status_code == 404

    # PATCH paused goes through the same local apply.
    admin.patch("/tenants/acme", json={"paused": True})
    assert admin.handle.call(lambda r: "acme" in r.tenants.gates)


def test_delete_drops_the_tenant_here(admin: AdminAPI, cluster: Cluster) -> None:
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    admin.post("/tenants/acme/pause")
    assert admin.delete("/tenants/acme", headers={"If-Match": '"1"'}).status_code == 412
    deleted = admin.delete("/tenants/acme", headers={"If-Match": '"2"'})
    assert deleted.status_code == 204 and deleted.content == b""
    # drop() ran before the reply: the pause gate it closes at the start is gone again, and
    # the tenant's clients and pools are forgotten.
    assert admin.handle.call(
        lambda r: "acme" not in r.tenants.gates and "acme" not in r.tenants.clients
    )
    assert admin.get("/tenants/acme").status_code == 404
    assert admin.delete("/tenants/acme").status_code == 404
    assert admin.get("/tenants").json() == []


def test_status(admin: AdminAPI, cluster: Cluster) -> None:
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    reply = admin.get("/tenants/acme/status")
    assert reply.status_code == 200, reply.text
    status = reply.json()
    assert status["tenant_id"] == "acme" and status["paused"] is False
    assert status["clients"] == {"total": 0, "active": 0, "waiting": 0}
    assert status["pools"] == {} and status["record_stale"] is False
    assert status["tenant"]["version"] == 1 and status["tenant"]["server_password"] == MASK
    assert admin.get("/tenants/nope/status").status_code == 404


def test_conflicts_and_unknowns(admin: AdminAPI, cluster: Cluster) -> None:
    assert admin.post("/tenants", json=tenant_body(cluster, "acme")).status_code == 201
    again = admin.post("/tenants", json=tenant_body(cluster, "acme"))
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    for method, path in [
        ("GET", "/tenants/nope"),
        ("DELETE", "/tenants/nope"),
        ("GET", "/tenants/nope/status"),
    ]:
        reply = admin.request(method, path)
        assert reply.status_code == 404, (method, path)
        assert reply.json() == {"detail": 'tenant "nope" does not exist'}


def test_invalid_bodies_are_422_naming_the_field(admin: AdminAPI, cluster: Cluster) -> None:
    cases = {
        "database": tenant_body(cluster, database=""),
        "tenant_id": tenant_body(cluster, tenant_id="Not Valid!"),
        "primary": tenant_body(cluster, cluster={"replicas": []}),
        "colour": tenant_body(cluster, colour="blue"),  # unknown fields are refused
        "size": tenant_body(cluster, pool={"size": 0}),
    }
    for field, body in cases.items():
        reply = admin.post("/tenants", json=body)
        assert reply.status_code == 422, (field, reply.text)
        locs = [error["loc"] for error in reply.json()["detail"]]
        assert any(field in loc for loc in locs), (field, locs)
    # A rule spanning fields names itself in the message.
    shared = admin.post("/tenants", json=tenant_body(cluster, mode="shared"))
    assert shared.status_code == 422 and "tenant_key" in shared.text
    broken_json = admin.post(
        "/tenants", content=b'{"tenant_id": ', headers={"Content-Type": "application/json"}
    )
    assert broken_json.status_code == 422
    # JSON has no infinity: a number that overflows to it is refused, not stored.
    huge = admin.post(
        "/tenants",
        content=b'{"limits": {"max_replica_lag": 1e999}}',
        headers={"Content-Type": "application/json"},
    )
    assert huge.status_code == 422, huge.text
    assert admin.post("/tenants/acme/users", json={"name": "x"}).status_code == 422


def test_no_reply_carries_a_secret(admin: AdminAPI, cluster: Cluster) -> None:
    verifier = scram_verifier("given-verifier-pw")
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    admin.put(
        "/tenants/acme",
        json={k: v for k, v in tenant_body(cluster).items() if k != "tenant_id"},
    )
    admin.post("/tenants/acme/users", json={"name": "bob", "auth": "md5", "password": "bob-pw"})
    admin.post("/tenants/acme/users", json={"name": "dave", "verifier": verifier})
    admin.patch("/tenants/acme", json={"server_password": "rotated-pw"})
    admin.post("/tenants/acme/pause")
    admin.get("/tenants")
    admin.get("/tenants/acme")
    admin.get("/tenants/acme/status")
    # 422s must not echo the input either: it holds the passwords.
    admin.post("/tenants", json=tenant_body(cluster, "Bad Id", server_password="rotated-pw"))
    admin.post(
        "/tenants/acme/users", json={"name": "x", "password": "bob-pw", "verifier": verifier}
    )
    stored = admin.handle.run(admin.router.tenants.store.get("acme"))
    secrets = [
        SERVER_PASSWORD,
        CLIENT_PASSWORD,
        "bob-pw",
        "rotated-pw",
        verifier,
        *(user.verifier for user in stored.users if user.verifier),
        "md5",  # start of an md5 hash; no reply has reason to contain it ...
    ]
    assert len(admin.responses) == 11
    assert [u.name for u in stored.users] == ["alice", "bob", "dave"]
    for reply in admin.responses:
        text = reply.text.replace('"md5"', "")  # ... but the auth method name
        for secret in secrets:
            assert secret not in text, (reply.request.url, secret)
        assert "SCRAM-SHA-256$" not in text


def test_unique_ids_across_tests_do_not_leak(admin: AdminAPI) -> None:
    # Each test's router has a registry prefix of its own: the session's Redis holds other
    # tests' tenants, and this one sees none of them.
    assert admin.get("/tenants").json() == []
    assert admin.router.settings.registry_prefix.startswith("admin-test-")
