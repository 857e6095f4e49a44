"""POST /tenants with provision: the database (and role) created on the tenant's real primary,
idempotently, and nothing left behind when a step fails."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from router.admin.server import serve
from tests.admin.conftest import CLIENT_PASSWORD, AdminAPI, tenant_body
from tests.cluster import Cluster
from tests.registry.conftest import free_port


class Names:
    """Unique database and role names for one test; whatever exists of them is dropped after."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.databases: list[str] = []
        self.roles: list[str] = []

    def database(self) -> str:
        self.databases.append(f"adm_db_{uuid.uuid4().hex[:10]}")
        return self.databases[-1]

    def role(self, create: str | None = None) -> str:
        """A role name; with ``create`` (e.g. "LOGIN CREATEROLE"), the role made now."""
        self.roles.append(f"adm_role_{uuid.uuid4().hex[:10]}")
        if create is not None:
            self.cluster.psql(f"CREATE ROLE {self.roles[-1]} {create}")
        return self.roles[-1]

    def cleanup(self) -> None:
        for name in self.databases:
            self.cluster.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # pools hold it
        for name in reversed(self.roles):
            self.cluster.psql(f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def names(cluster: Cluster) -> Iterator[Names]:
    made = Names(cluster)
    try:
        yield made
    finally:
        made.cleanup()


def _scalar(cluster: Cluster, sql: str) -> str:
    return cluster.psql(sql).strip()


def _database_owner(cluster: Cluster, name: str) -> str:
    return _scalar(
        cluster,
        f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{name}'",
    )


def _role_exists(cluster: Cluster, name: str) -> bool:
    return _scalar(cluster, f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'") == "1"


@pytest.fixture
def provisioning_api(admin: AdminAPI) -> Iterator[Callable[[str], AdminAPI]]:
    """A second admin API on the same router, with a provisioning login (create_app's
    provision_dsn, which Router.start() passes from admin_provision_dsn)."""
    servers = []

    def start(dsn: str) -> AdminAPI:
        server = admin.handle.run(serve(admin.router, provision_dsn=dsn))
        servers.append(server)
        return AdminAPI(admin.handle, server, admin.token)

    yield start
    for server in servers:
        admin.handle.run(server.stop())


def test_provision_creates_the_database_as_its_server_user(
    admin: AdminAPI, cluster: Cluster, names: Names
) -> None:
    database = names.database()
    body = tenant_body(cluster, "acme", database=database, provision=True)
    created = admin.post("/tenants", json=body)
    assert created.status_code == 201, created.text
    assert _database_owner(cluster, database) == "pgr_scram"  # server_user may CREATEDB
    with psycopg.connect(admin.handle.dsn("alice", CLIENT_PASSWORD, "acme")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (database,)

    # Idempotent: a second tenant in the same (now existing) database, asked by query.
    again = admin.post(
        "/tenants?provision=true", json=tenant_body(cluster, "beta", database=database)
    )
    assert again.status_code == 201, again.text
    assert _database_owner(cluster, database) == "pgr_scram"


def test_provision_role_creates_role_and_database(
    admin: AdminAPI,
    cluster: Cluster,
    names: Names,
    provisioning_api: Callable[[str], AdminAPI],
) -> None:
    database, role = names.database(), names.role()
    body = tenant_body(
        cluster, "acme", database=database, server_user=role, server_password="role-pw"
    )
    refused = admin.post("/tenants", json=body | {"provision_role": True})
    assert refused.status_code == 502 and "provisioning login" in refused.json()["detail"]
    assert not _role_exists(cluster, role)

    api = provisioning_api(cluster.primary.dsn(user="postgres"))
    created = api.post("/tenants?provision_role=true", json=body)
    assert created.status_code == 201, created.text
    assert _database_owner(cluster, database) == role
    stored = _scalar(cluster, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")
    assert stored.startswith("SCRAM-SHA-256$4096:")  # sent as a verifier, not plaintext
    with psycopg.connect(admin.handle.dsn("alice", CLIENT_PASSWORD, "acme")) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            role,
            database,
        )


def test_a_failed_provisioning_leaves_nothing(
    admin: AdminAPI,
    cluster: Cluster,
    names: Names,
    provisioning_api: Callable[[str], AdminAPI],
) -> None:
    # A provisioning login that may create roles but not databases: the role is made, the
    # database refused, and the role must be dropped again.
    provisioner = names.role(create="LOGIN CREATEROLE")
    database, role = names.database(), names.role()
    api = provisioning_api(cluster.primary.dsn(user=provisioner))
    body = tenant_body(
        cluster, "acme", database=database, server_user=role, server_password="role-pw",
        provision_role=True,
    )  # fmt: skip
    failed = api.post("/tenants", json=body)
    assert failed.status_code == 502, failed.text
    assert "permission denied to create database" in failed.json()["detail"]
    assert not _role_exists(cluster, role)
    assert _database_owner(cluster, database) == ""
    assert admin.get("/tenants/acme").status_code == 404


def test_provisioning_failures_store_nothing(
    admin: AdminAPI, cluster: Cluster, names: Names
) -> None:
    database = names.database()
    weak = names.role(create="LOGIN")  # no CREATEDB, and no provisioning login to fall back on
    reply = admin.post(
        "/tenants",
        json=tenant_body(cluster, "acme", database=database, server_user=weak, provision=True),
    )
    assert reply.status_code == 502
    assert reply.json()["detail"] == (
        f'server_user "{weak}" may not create databases, and no provisioning login is configured'
    )
    nowhere = {"primary": {"host": "127.0.0.1", "port": free_port()}}
    reply = admin.post(
        "/tenants", json=tenant_body(cluster, "acme", cluster=nowhere, provision=True)
    )
    assert reply.status_code == 502 and "cannot connect to 127.0.0.1:" in reply.json()["detail"]
    assert admin.get("/tenants").json() == []
    assert _database_owner(cluster, database) == ""


def test_an_existing_tenant_provisions_nothing(
    admin: AdminAPI, cluster: Cluster, names: Names
) -> None:
    admin.post("/tenants", json=tenant_body(cluster, "acme"))
    database = names.database()
    again = admin.post(
        "/tenants", json=tenant_body(cluster, "acme", database=database, provision=True)
    )
    assert again.status_code == 409
    assert _database_owner(cluster, database) == ""
