"""Prometheus metrics: read from the router's own state when /metrics is scraped.

The router already keeps what these report (clients, pools' stats, routing decisions, node
states, cache counters, each database's SHOW STATS counters), so nothing on the data path is
instrumented for them alone: ``RouterCollector`` walks those objects at scrape time, in the
router's event loop (the admin API runs there), so it reads them without locks.

One measurement has no state to read back: how long transactions wait for a server connection.
The pool reports each wait through ``observe_pool_wait()`` into a module-level histogram, shared
by every router of the process (there is one in production; tests that run several read it as a
process-wide total).

Label cardinality is bounded: tenant ids and pool names come from the registry, which may hold
thousands. ``LabelBudget`` keeps at most N distinct values (``max_tenant_labels``, and
``max_pool_labels`` for pools and databases) and folds the rest into ``other``. A value keeps its label while
it stays present, so series do not hop between names from one scrape to the next.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from router.stats.histogram import FastHistogram
from router.stats.traffic import TOTALS

if TYPE_CHECKING:
    from router.app import Router

OTHER = "other"
DEFAULT_MAX_TENANT_LABELS = 100
DEFAULT_MAX_POOL_LABELS = 200
# Clients of databases from the settings file have no tenant.
NO_TENANT = ""

CLIENT_STATES = ("active", "waiting", "idle")
SERVER_STATES = ("active", "idle", "connecting")

# From a pool hit (well under a millisecond) to query_wait_timeout's default (120 s).
POOL_WAIT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
)  # fmt: skip

# Lock-free (router/stats/histogram.py): it is observed for every transaction that waited,
# which under load is nearly all of them, and prometheus_client's Histogram takes a lock per
# bucket and sum. Read at scrape time by PoolWaitCollector.
POOL_WAIT = FastHistogram(POOL_WAIT_BUCKETS)
observe_pool_wait = POOL_WAIT.observe
"""Record one wait for a server connection (called by the pool when it hands one over)."""

# The families of router/stats/traffic.py's TOTALS, in their order.
_TRAFFIC_FAMILIES = (
    ("pgrouter_database_transactions_total", "Transactions ended (ReadyForQuery idle)"),
    ("pgrouter_database_queries_total", "Queries answered (one per Query, or per Sync)"),
    ("pgrouter_database_received_bytes_total", "Bytes of client messages forwarded to servers"),
    ("pgrouter_database_sent_bytes_total", "Bytes of server messages forwarded to clients"),
    ("pgrouter_database_transaction_seconds_total", "Time from a transaction's first message to its end"),
    ("pgrouter_database_query_seconds_total", "Time from a query's message to its ReadyForQuery"),
    ("pgrouter_database_wait_seconds_total", "Time transactions waited for a server connection"),
)


class PoolWaitCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(
            "pgrouter_pool_wait_seconds",
            "Time a transaction waited for a server connection from its pool",
            buckets=POOL_WAIT.cumulative(),
            sum_value=POOL_WAIT.sum,
        )


def metrics_registry(
    router: Router,
    *,
    max_tenant_labels: int = DEFAULT_MAX_TENANT_LABELS,
    max_pool_labels: int = DEFAULT_MAX_POOL_LABELS,
) -> CollectorRegistry:
    """The registry /metrics renders: the router's state and the pool wait histogram."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        RouterCollector(
            router, max_tenant_labels=max_tenant_labels, max_pool_labels=max_pool_labels
        )
    )
    registry.register(PoolWaitCollector())
    return registry


class LabelBudget:
    """At most ``limit`` distinct label values; the rest are reported as ``other``."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("label limit must be >= 0")
        self.limit = limit
        self._kept: set[str] = set()

    def assign(self, values: Iterable[str]) -> dict[str, str]:
        present = set(values)
        self._kept &= present  # gone values free their slots
        for value in sorted(present - self._kept):
            if len(self._kept) >= self.limit:
                break
            self._kept.add(value)
        return {value: value if value in self._kept else OTHER for value in present}


class RouterCollector(Collector):
    def __init__(self, router: Router, *, max_tenant_labels: int, max_pool_labels: int) -> None:
        self.router = router
        self.tenant_labels = LabelBudget(max_tenant_labels)
        self.tenant_server_labels = LabelBudget(max_tenant_labels)
        self.pool_labels = LabelBudget(max_pool_labels)
        self.database_labels = LabelBudget(max_pool_labels)

    def collect(self) -> Iterator[Metric]:
        yield self._client_connections()
        yield from self._server_connections()
        yield from self._traffic()
        yield from self._routing()
        yield from self._registry()
        router = self.router
        yield GaugeMetricFamily(
            "pgrouter_pinned_clients",
            "Clients pinned to one server connection (session state the pool cannot share)",
            value=len(router.pinned_clients),
        )
        yield from self._measured()
        cancels = CounterMetricFamily(
            "pgrouter_cancel_requests_total",
            "CancelRequests received, by what became of them (README \"Multi-core\")",
            labels=["outcome"],
        )
        for outcome, n in router.cancel_outcomes.items():
            cancels.add_metric([str(outcome)], n)
        yield cancels
        classifier = router.classifier
        yield CounterMetricFamily(
            "pgrouter_classifier_cache_hits_total",
            "Statement classifications answered from the cache",
            value=classifier.hits,
        )
        yield CounterMetricFamily(
            "pgrouter_classifier_cache_misses_total",
            "Statement classifications computed (not cached)",
            value=classifier.misses,
        )

    def _measured(self) -> Iterator[Metric]:
        """What the hot path measures (router/stats/): transaction durations, errors sent to
        clients by SQLSTATE class, and the query statistics' own counters."""
        router = self.router
        durations = router.transaction_durations
        yield HistogramMetricFamily(
            "pgrouter_transaction_duration_seconds",
            "Transactions on a server connection, from the first message sent to the "
            "ReadyForQuery that leaves it idle (autocommit statements included)",
            buckets=durations.cumulative(),
            sum_value=durations.sum,
        )
        errors = CounterMetricFamily(
            "pgrouter_client_errors_total",
            "ErrorResponses sent to clients, the server's and the router's own, by SQLSTATE class",
            labels=["class"],
        )
        for cls, n in sorted(router.error_classes.items()):
            errors.add_metric([cls], n)
        yield errors
        yield CounterMetricFamily(
            "pgrouter_reprepared_total",
            "Exchanges run again after DDL made a prepared statement's plan stale "
            '("cached plan must not change result type"), the error swallowed',
            value=router.reprepared,
        )
        stats = router.query_stats
        if stats is not None:
            yield CounterMetricFamily(
                "pgrouter_slow_queries_total",
                "Calls slower than slow_query_ms (each one is logged)",
                value=stats.slow_queries,
            )
            yield GaugeMetricFamily(
                "pgrouter_query_fingerprints",
                "Statement fingerprints held by the query statistics",
                value=len(stats.entries),
            )

    def _client_connections(self) -> Metric:
        counts: Counter[tuple[str, str]] = Counter()
        for client in list(self.router.clients.values()):
            tenant = client.tenant.tenant_id if client.tenant is not None else NO_TENANT
            if client.server is not None:
                state = "active"
            elif client._waiting_on is not None:
                state = "waiting"
            else:
                state = "idle"
            counts[tenant, state] += 1
        labels = self.tenant_labels.assign(t for t, _ in counts if t != NO_TENANT)
        labels[NO_TENANT] = NO_TENANT
        folded: Counter[tuple[str, str]] = Counter()
        for (tenant, state), n in counts.items():
            folded[labels[tenant], state] += n
        family = GaugeMetricFamily(
            "pgrouter_client_connections",
            f"Client connections by tenant and state ({OTHER}: tenants beyond the label limit)",
            labels=["tenant", "state"],
        )
        for tenant in sorted({t for t, _ in folded}):
            for state in CLIENT_STATES:
                family.add_metric([tenant, state], folded[tenant, state])
        return family

    def _server_connections(self) -> Iterator[Metric]:
        pools = list(self.router.pools.pools.values())
        stats = [(pool.name, pool.stats()) for pool in pools]
        labels = self.pool_labels.assign(name for name, _ in stats)
        servers: Counter[tuple[str, str]] = Counter()
        waiting: Counter[str] = Counter()
        for name, stat in stats:
            for state in SERVER_STATES:
                servers[labels[name], state] += stat[state]
            waiting[labels[name]] += stat["waiting"]
        reserve: Counter[str] = Counter()
        for pool in pools:
            if pool.settings.reserve_size:
                reserve[labels[pool.name]] += pool.reserve_opened
        family = GaugeMetricFamily(
            "pgrouter_server_connections",
            "Server connections by pool and state",
            labels=["pool", "state"],
        )
        for (pool, state), n in sorted(servers.items()):
            family.add_metric([pool, state], n)
        yield family
        family = GaugeMetricFamily(
            "pgrouter_pool_waiting_clients",
            "Transactions waiting for a server connection, by pool",
            labels=["pool"],
        )
        for pool, n in sorted(waiting.items()):
            family.add_metric([pool], n)
        yield family
        family = CounterMetricFamily(
            "pgrouter_pool_reserve_opened",
            "Server connections opened beyond pool_size for clients that waited reserve_pool_timeout, by pool",
            labels=["pool"],
        )
        for pool, n in sorted(reserve.items()):
            family.add_metric([pool], n)
        yield family
        # The same, per tenant: the pools its clients use (a shared-schema pool counts for
        # each of its tenants).
        per_tenant: Counter[tuple[str, str]] = Counter()
        tenant_pools = {tid: list(pools) for tid, pools in self.router.tenants.pools.items()}
        tenant_labels = self.tenant_server_labels.assign(tenant_pools)
        for tenant_id, pools in tenant_pools.items():
            for pool in pools:
                stat = pool.stats()
                for state in SERVER_STATES:
                    per_tenant[tenant_labels[tenant_id], state] += stat[state]
        family = GaugeMetricFamily(
            "pgrouter_tenant_server_connections",
            f"Server connections of the pools each tenant uses, by state ({OTHER}: beyond the label limit)",
            labels=["tenant", "state"],
        )
        for (tenant, state), n in sorted(per_tenant.items()):
            family.add_metric([tenant, state], n)
        yield family

    def _traffic(self) -> Iterator[Metric]:
        """SHOW STATS' totals (router/stats/traffic.py), by database as clients name it
        (`other`: beyond max_pool_labels databases)."""
        traffic = self.router.pools.traffic
        labels = self.database_labels.assign(traffic)
        sums: dict[str, list] = {}
        for name, counters in traffic.items():
            into = sums.setdefault(labels[name], [0] * len(TOTALS))
            for i, value in enumerate(counters.totals()):
                into[i] += value
        for i, (name, text) in enumerate(_TRAFFIC_FAMILIES):
            family = CounterMetricFamily(name, f"{text}, by database as clients name it, or tenant (SHOW STATS)", labels=["database"])
            for database, values in sorted(sums.items()):
                family.add_metric([database], values[i])
            yield family

    def _routing(self) -> Iterator[Metric]:
        routed = CounterMetricFamily(
            "pgrouter_transactions_routed_total",
            "Transactions routed, by cluster, node role and reason",
            labels=["cluster", "role", "reason"],
        )
        fallbacks = CounterMetricFamily(
            "pgrouter_routing_fallbacks_total",
            "Reads that could not go to a replica, by cluster and reason",
            labels=["cluster", "reason"],
        )
        lag_seconds = GaugeMetricFamily(
            "pgrouter_replica_lag_seconds",
            "Replication lag of each replica, in seconds (+Inf: behind, since unknown)",
            labels=["cluster", "node"],
        )
        lag_bytes = GaugeMetricFamily(
            "pgrouter_replica_lag_bytes",
            "Replication lag of each replica, in bytes of WAL",
            labels=["cluster", "node"],
        )
        node_up = GaugeMetricFamily(
            "pgrouter_node_up",
            "1 if the node answered its last health check, else 0",
            labels=["cluster", "node", "role"],
        )
        for name, split in sorted(self.router.splits.items()):
            for (role, reason), n in sorted(split.decisions.items()):
                routed.add_metric([name, str(role), str(reason)], n)
            for reason, n in sorted(split.fallbacks.items()):
                fallbacks.add_metric([name, str(reason)], n)
            for node in split.topology.nodes:
                address = f"{node.host}:{node.port}"
                node_up.add_metric([name, address, str(node.role)], 1 if node.healthy else 0)
                if node.lag_seconds is not None:
                    lag_seconds.add_metric([name, address], node.lag_seconds)
                if node.lag_bytes is not None:
                    lag_bytes.add_metric([name, address], node.lag_bytes)
        yield from (routed, fallbacks, lag_seconds, lag_bytes, node_up)

    def _registry(self) -> Iterator[Metric]:
        cache = self.router.tenants.cache
        if cache is None:
            return  # no tenant registry configured
        yield CounterMetricFamily(
            "pgrouter_registry_cache_hits_total",
            "Tenant lookups answered from the local cache",
            value=cache.hits,
        )
        yield CounterMetricFamily(
            "pgrouter_registry_cache_misses_total",
            "Tenant lookups that read the registry (Redis)",
            value=cache.misses,
        )
        yield CounterMetricFamily(
            "pgrouter_registry_stale_serves_total",
            "Tenant lookups served from the cache while the registry was unreachable",
            value=cache.stale_serves,
        )
        yield GaugeMetricFamily(
            "pgrouter_registry_stale",
            "1 while the cache cannot vouch for its entries (registry unreachable), else 0",
            value=1 if cache.stale else 0,
        )
        yield GaugeMetricFamily(
            "pgrouter_registry_cached_tenants", "Tenants in the local cache", value=len(cache)
        )
