"""/metrics read from a real router's state: clients of real tenants logged in through it, pools,
routing decisions and node states of a cluster with two replicas, the registry cache; label
cardinality bounded; the pool wait histogram."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import psycopg
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.admin.metrics import OTHER, LabelBudget, metrics_registry, observe_pool_wait
from tests.admin.conftest import CLIENT_PASSWORD, AdminAPI, tenant_body
from tests.cluster import Cluster

NAMES = {
    "pgrouter_client_connections",
    "pgrouter_server_connections",
    "pgrouter_pool_waiting_clients",
    "pgrouter_transactions_routed",  # counters: the family name drops _total
    "pgrouter_routing_fallbacks",
    "pgrouter_replica_lag_seconds",
    "pgrouter_replica_lag_bytes",
    "pgrouter_node_up",
    "pgrouter_registry_cache_hits",
    "pgrouter_registry_cache_misses",
    "pgrouter_registry_stale_serves",
    "pgrouter_registry_stale",
    "pgrouter_registry_cached_tenants",
    "pgrouter_pinned_clients",
    "pgrouter_classifier_cache_hits",
    "pgrouter_classifier_cache_misses",
    "pgrouter_pool_wait_seconds",
}


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], parsed by prometheus_client's own parser."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def _by(samples: list[tuple[dict[str, str], float]], *keys: str) -> dict[tuple[str, ...], float]:
    return {tuple(labels[k] for k in keys): value for labels, value in samples}


@pytest.fixture
def connections() -> Iterator[Callable[..., psycopg.Connection]]:
    with ExitStack() as stack:
        yield lambda dsn: stack.enter_context(psycopg.connect(dsn, autocommit=True))


def test_metrics_read_the_router_state(
    start_admin: Callable[..., AdminAPI],
    cluster: Cluster,
    connections: Callable[..., psycopg.Connection],
) -> None:
    admin = start_admin(split=True)
    for tenant in ("acme", "beta"):
        assert admin.post("/tenants", json=tenant_body(cluster, tenant)).status_code == 201
    handle = admin.handle
    idle = connections(handle.dsn("alice", CLIENT_PASSWORD, "acme"))
    idle.execute("SELECT 1")
    busy = connections(handle.dsn("alice", CLIENT_PASSWORD, "beta"))
    busy.execute("BEGIN")
    busy.execute("SELECT 1")  # holds its server connection until COMMIT
    config_client = connections(handle.dsn("alice", "alice-pw", "app"))
    # A read on the file's cluster "main" (with replicas); a WITH query is not one the router
    # recognises without its classifier.
    config_client.execute("WITH q AS (SELECT 1 AS n) SELECT n FROM q")

    scrape = admin.get("/metrics", token=None)
    assert scrape.status_code == 200
    families = {family.name for family in text_string_to_metric_families(scrape.text)}
    assert NAMES <= families, NAMES - families
    samples = _samples(scrape.text)

    clients = _by(samples["pgrouter_client_connections"], "tenant", "state")
    assert clients[("acme", "idle")] == 1 and clients[("acme", "active")] == 0
    assert clients[("beta", "active")] == 1
    assert clients[("", "idle")] == 1  # the file's database: no tenant
    assert sum(clients.values()) == 3

    servers = _by(samples["pgrouter_server_connections"], "pool", "state")
    assert sum(n for (pool, state), n in servers.items() if state == "active") == 1
    per_tenant = _by(samples["pgrouter_tenant_server_connections"], "tenant", "state")
    # Both tenants' pools are one here (same database and server user): each reports it.
    assert per_tenant[("beta", "active")] == 1
    assert {tenant for tenant, _ in per_tenant} == {"acme", "beta"}
    assert sum(servers.values()) >= 3  # one server each at least, idle or active

    routed = _by(samples["pgrouter_transactions_routed_total"], "cluster", "role", "reason")
    assert sum(n for (name, _, _), n in routed.items() if name == "main") >= 1
    nodes = _by(samples["pgrouter_node_up"], "cluster", "node", "role")
    main_nodes = {(node, role): up for (name, node, role), up in nodes.items() if name == "main"}
    primary = f"{cluster.primary.host}:{cluster.primary.port}"
    assert main_nodes[(primary, "primary")] == 1
    replicas = {f"{r.host}:{r.port}" for r in cluster.replicas}
    assert {node for node, role in main_nodes if role == "replica"} == replicas
    lag = _by(samples["pgrouter_replica_lag_bytes"], "cluster", "node")
    assert {node for name, node in lag if name == "main"} >= replicas

    assert samples["pgrouter_registry_stale"] == [({}, 0.0)]
    assert samples["pgrouter_registry_cache_misses_total"][0][1] >= 2  # acme, beta logins
    assert samples["pgrouter_registry_cached_tenants"] == [({}, 2.0)]
    assert samples["pgrouter_pinned_clients"] == [({}, 0.0)]
    classified = (
        samples["pgrouter_classifier_cache_hits_total"][0][1]
        + samples["pgrouter_classifier_cache_misses_total"][0][1]
    )
    assert classified >= 1

    busy.execute("COMMIT")
    after = _by(
        _samples(admin.get("/metrics").text)["pgrouter_client_connections"], "tenant", "state"
    )
    assert after[("beta", "active")] == 0 and after[("beta", "idle")] == 1


def test_tenant_labels_are_bounded(
    start_admin: Callable[..., AdminAPI],
    cluster: Cluster,
    connections: Callable[..., psycopg.Connection],
) -> None:
    admin = start_admin()
    handle = admin.handle
    clients = {}
    for tenant in ("t1", "t2", "t3"):
        admin.post("/tenants", json=tenant_body(cluster, tenant))
        clients[tenant] = connections(handle.dsn("alice", CLIENT_PASSWORD, tenant))
    registry = handle.call(lambda r: metrics_registry(r, max_tenant_labels=2))

    def scrape() -> dict[tuple[str, ...], float]:
        text = handle.call(lambda r: generate_latest(registry).decode())  # in the router's loop
        samples = _samples(text)["pgrouter_client_connections"]
        return {k: n for k, n in _by(samples, "tenant", "state").items() if k[1] == "idle"}

    assert scrape() == {("t1", "idle"): 1, ("t2", "idle"): 1, (OTHER, "idle"): 1}
    clients["t1"].close()
    handle.wait_for(lambda r: not r.tenants.clients.get("t1"), what="t1's client to go")
    # t2 keeps its label; t3 takes the slot t1 left.
    assert scrape() == {("t2", "idle"): 1, ("t3", "idle"): 1}


def test_label_budget() -> None:
    budget = LabelBudget(2)
    assert budget.assign(["b", "c", "a"]) == {"a": "a", "b": "b", "c": OTHER}
    # A newcomer sorting first does not take a label from those that hold one.
    assert budget.assign(["0", "a", "b"]) == {"0": OTHER, "a": "a", "b": "b"}
    assert budget.assign(["0", "b"]) == {"0": "0", "b": "b"}
    assert LabelBudget(0).assign(["x"]) == {"x": OTHER}
    with pytest.raises(ValueError):
        LabelBudget(-1)


def test_observe_pool_wait_feeds_the_histogram(admin: AdminAPI) -> None:
    def wait_samples() -> dict[str, float]:
        found = _samples(admin.get("/metrics").text)
        buckets = _by(found["pgrouter_pool_wait_seconds_bucket"], "le")
        return {
            "count": found["pgrouter_pool_wait_seconds_count"][0][1],
            "le_0.005": buckets[("0.005",)],
            "le_0.001": buckets[("0.001",)],
        }

    before = wait_samples()
    observe_pool_wait(0.003)
    after = wait_samples()
    assert after["count"] == before["count"] + 1
    assert after["le_0.005"] == before["le_0.005"] + 1
    assert after["le_0.001"] == before["le_0.001"]
