"""GET /pools and GET /topology: what an operator asks PgBouncer with SHOW POOLS, and the
cluster nodes as the lag monitor sees them, behind the admin token."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
import pytest

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
    assert body["pools"][pool] == {
        "size": 1, "servers": 1, "idle": 0, "active": 1, "connecting": 0, "waiting": 1, "reserve_size": 0, "reserve_opened": 0
    }
    holder.execute("COMMIT")
    waited.join(10)
    wait_until(lambda: pools()["clients"]["active"] == 0, 10, "both transactions done")
    assert pools()["pools"][pool] == {
        "size": 1, "servers": 1, "idle": 1, "active": 0, "connecting": 0, "waiting": 0, "reserve_size": 0, "reserve_opened": 0
    }
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


def test_pause_and_resume_a_database_over_http(start_admin: Callable[..., AdminAPI]) -> None:
    """POST /databases/app/pause answers once no client of `app` holds a server connection;
    the next transaction waits until POST /databases/app/resume. An unknown name is 404."""
    admin = start_admin(redis_url=None, secret_key=None)
    assert admin.post("/databases/app/pause", token=None).status_code == 401
    assert admin.post("/databases/nosuch/pause").status_code == 404
    busy = psycopg.connect(admin.handle.dsn("carol"), autocommit=True)
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    replies: list = []
    pausing = threading.Thread(target=lambda: replies.append(admin.post("/databases/app/pause")))
    pausing.start()
    wait_until(lambda: admin.handle.call(lambda r: "app" in r.db_gates), 10, "the gate")
    assert pausing.is_alive(), "the pause answered while a transaction was running"
    busy.execute("COMMIT")
    pausing.join(10)
    assert replies[0].status_code == 200
    assert replies[0].json() == {"database": "app", "paused": True, "still_in_flight": 0}
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(busy.execute("SELECT 2").fetchone()))
    waiting.start()
    wait_until(lambda: admin.get("/pools").json()["clients"]["waiting"] == 1, 10, "the next transaction waits")
    resumed = admin.post("/databases/app/resume")
    assert resumed.json() == {"database": "app", "paused": False, "still_in_flight": 0}
    waiting.join(10)
    assert got == [(2,)]
    busy.close()


def test_database_commands_over_http(start_admin: Callable[..., AdminAPI]) -> None:
    """POST /databases/app/{disable,enable,kill,reconnect,wait_close}: the console's commands.
    DISABLE refuses logins until ENABLE; KILL disconnects the database's clients and counts
    them; RECONNECT counts the server connections it closes. Unknown names 404, unknown
    commands 422, no token 401."""
    admin = start_admin(redis_url=None, secret_key=None)
    assert admin.post("/databases/app/kill", token=None).status_code == 401
    assert admin.post("/databases/nosuch/kill").status_code == 404
    assert admin.post("/databases/app/explode").status_code == 422
    client = psycopg.connect(admin.handle.dsn("carol"), autocommit=True)
    client.execute("SELECT 1")  # a server connection, idle in the pool now
    reply = admin.post("/databases/app/reconnect")
    assert reply.status_code == 200
    assert reply.json() == {"database": "app", "command": "reconnect", "count": 1}
    assert admin.post("/databases/app/wait_close").json()["count"] == 0
    assert admin.post("/databases/app/disable").json() == {"database": "app", "command": "disable", "count": 0}
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        psycopg.connect(admin.handle.dsn("carol"))
    admin.post("/databases/app/enable")
    other = psycopg.connect(admin.handle.dsn("carol"), autocommit=True)
    assert admin.post("/databases/app/kill").json() == {"database": "app", "command": "kill", "count": 2}
    for conn in (client, other):
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            conn.execute("SELECT 1")
    admin.post("/databases/app/resume")
    with psycopg.connect(admin.handle.dsn("carol"), autocommit=True) as again:
        assert again.execute("SELECT 2").fetchone() == (2,)
    client.close()
    other.close()


def test_kill_client_over_http(start_admin: Callable[..., AdminAPI]) -> None:
    """GET /clients lists the clients, with the id their driver reports as the backend pid;
    POST /clients/{id}/kill, the console's KILL_CLIENT, disconnects the one with that id and
    the other goes on. An id nobody has is 404, anything but an id 422, no token 401."""
    admin = start_admin(redis_url=None, secret_key=None)
    victim = psycopg.connect(admin.handle.dsn("carol"), autocommit=True)
    other = psycopg.connect(admin.handle.dsn("carol"), autocommit=True)
    other.execute("SELECT pg_advisory_lock(7)")  # pins it
    pid = victim.info.backend_pid
    assert admin.get("/clients", token=None).status_code == 401
    listed = admin.get("/clients").json()
    assert listed["workers_reporting"] == 1
    by_id = {c["id"]: c for c in listed["clients"]}
    assert by_id.keys() == {pid, other.info.backend_pid}
    assert {k: v for k, v in by_id[other.info.backend_pid].items() if k not in ("address", "connected_seconds")} == {
        "worker": 0, "id": other.info.backend_pid, "user": "carol", "database": "app", "tenant": None,
        "state": "active", "tls": False, "pinned": ["advisory lock"],
    }  # fmt: skip
    assert admin.post(f"/clients/{pid}/kill", token=None).status_code == 401
    assert admin.post("/clients/carol/kill").status_code == 422
    assert admin.post("/clients/0/kill").status_code == 422
    assert admin.post(f"/clients/{pid}/kill").json() == {"client_id": pid, "killed": True}
    with pytest.raises(psycopg.OperationalError, match="administrator command"):
        victim.execute("SELECT 1")
    assert other.execute("SELECT 2").fetchone() == (2,)
    assert [c["id"] for c in admin.get("/clients").json()["clients"]] == [other.info.backend_pid]
    missing = admin.post(f"/clients/{pid}/kill")
    assert missing.status_code == 404 and f"no client with id {pid}" in missing.text
    victim.close()
    other.close()
