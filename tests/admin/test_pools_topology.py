"""GET /pools and GET /topology: what an operator asks PgBouncer with SHOW POOLS, and the
cluster nodes as the lag monitor sees them, behind the admin token."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg

from tests.admin.conftest import AdminAPI, wait_until
from tests.cluster import Cluster


def test_pools_count_clients_servers_and_waiters(start_admin: Callable[..., AdminAPI], cluster: Cluster) -> None:
    admin = start_admin(redis_url=None, secret_key=None, pool_size=1)
    assert admin.get("/pools", token=None).status_code == 401
    pool = f"app/postgres@{cluster.primary.host}:{cluster.primary.port}"
    holder = psycopg.connect(admin.handle.dsn("carol"), autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")  # holds the pool's only server connection
    waiter = psycopg.connect(admin.handle.dsn("carol"), autocommit=True)
    waited = threading.Thread(target=lambda: waiter.execute("SELECT 1"))
    waited.start()

    def pools() -> dict:
        reply = admin.get("/pools")
        assert reply.status_code == 200
        return reply.json()

    wait_until(lambda: pools()["pools"][pool]["waiting"] == 1, 10, "the second client waits")
    body = pools()
    assert body["clients"] == {"total": 2, "active": 1, "waiting": 1, "pinned": 0}
    assert body["pools"][pool] == {"size": 1, "servers": 1, "idle": 0, "active": 1, "connecting": 0, "waiting": 1}
    holder.execute("COMMIT")
    waited.join(10)
    wait_until(lambda: pools()["clients"]["active"] == 0, 10, "both transactions done")
    assert pools()["pools"][pool] == {"size": 1, "servers": 1, "idle": 1, "active": 0, "connecting": 0, "waiting": 0}
    holder.close()
    waiter.close()


def test_topology_lists_every_node_with_its_role_and_lag(start_admin: Callable[..., AdminAPI], cluster: Cluster) -> None:
    admin = start_admin(redis_url=None, secret_key=None, split=True)
    assert admin.get("/topology", token=None).status_code == 401

    def nodes() -> list[dict]:
        reply = admin.get("/topology")
        assert reply.status_code == 200
        return reply.json()["nodes"]

    wait_until(lambda: sum(n["eligible"] for n in nodes()) == 2, 10, "both replicas eligible")
    by_port = {n["port"]: n for n in nodes()}
    assert set(by_port) == {cluster.primary.port, *(r.port for r in cluster.replicas)}
    assert by_port[cluster.primary.port]["role"] == "primary"
    for node in nodes():
        assert node["cluster"] == "main" and node["healthy"] is True and node["last_error"] is None
        if node["role"] == "replica":
            assert node["lag_seconds"] is not None and node["lag_bytes"] is not None
    no_replicas = start_admin(redis_url=None, secret_key=None)
    assert no_replicas.get("/topology").json() == {"nodes": []}  # nothing monitored
