"""/metrics, GET /queries and GET /tenants/{id}/status of a router with several workers: worker 0 renders its own, asks its siblings for
theirs (router/workers/control.py) and merges them into one exposition, as if one process had
served every client.

Series are matched by sample name and label set. Most are parts of a whole (clients, server
connections, transactions, errors, histogram buckets), so they are added up. Some gauges are
not: every worker measures the same thing for itself (a replica's lag, whether a node is up,
whether the registry cache is stale) and adding them up would mean nothing. Those are listed
below with how they combine; a new non-additive gauge must be added here. ``*_created``
timestamps keep the earliest.

Query statistics merge by (tenant, fingerprint): calls, time, rows and errors add up, the
maximum is the largest, the text is the first worker's. A tenant's status adds up clients and
pool counters; its nodes are worker 0's measurements, with every worker's in-flight reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from router.stats.queries import QueryStat
from router.workers.shares import WorkerSlot

# The worst any worker sees: the largest lag, stale if any worker's cache is.
MAX_GAUGES = frozenset(
    {
        "pgrouter_replica_lag_seconds",
        "pgrouter_replica_lag_bytes",
        "pgrouter_registry_stale",
        "pgrouter_registry_cached_tenants",  # the same tenants, cached by each worker
        "pgrouter_query_fingerprints",  # each worker keeps its own top-N: a lower bound
    }
)
# Up only if every worker's last health check reached the node.
MIN_GAUGES = frozenset({"pgrouter_node_up"})

Combine = Callable[[float, float], float]


def combine_rule(family: Metric) -> Combine:
    """How two workers' values of one series of ``family`` make the router's."""
    if family.name.endswith("_created"):
        return min
    if family.type == "gauge" and family.name in MAX_GAUGES:
        return max
    if family.type == "gauge" and family.name in MIN_GAUGES:
        return min
    return _add


def _add(a: float, b: float) -> float:
    return a + b


def merge(texts: Iterable[str]) -> list[Metric]:
    """The families of several Prometheus text expositions, merged series by series (in the
    order they first appear)."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    labels: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, str]] = {}
    rules: dict[str, Combine] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
                rules[family.name] = combine_rule(family)
            series, rule = values[family.name], rules[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in series:
                    series[key] = rule(series[key], sample.value)
                else:
                    series[key] = sample.value
                    labels[key] = sample.labels
    for name, family in merged.items():
        for key, value in values[name].items():
            family.add_sample(key[0], labels[key], value)
    return list(merged.values())


def render(families: Iterable[Metric]) -> bytes:
    """The text exposition of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families)))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def all_workers_metrics(slot: WorkerSlot, own: bytes) -> bytes:
    """Worker ``slot``'s /metrics (``own``) merged with its siblings'. Two more gauges say how
    many workers there are and how many answered (a stuck worker is left out, not waited for)."""
    from router.workers.control import sibling_metrics

    others = await sibling_metrics(slot)
    texts = [own.decode(), *(text for text in others if text is not None)]
    families = merge(texts)
    families.append(GaugeMetricFamily("pgrouter_workers", "Worker processes configured", value=slot.count))
    families.append(
        GaugeMetricFamily(
            "pgrouter_workers_reporting",
            "Workers whose metrics this scrape includes (the others did not answer in time)",
            value=len(texts),
        )
    )
    return render(families)


def merge_query_stats(groups: Iterable[Iterable[QueryStat]]) -> list[QueryStat]:
    """Several workers' statistics as one, largest total time first. The inputs are left alone."""
    merged: dict[tuple[str, str], QueryStat] = {}
    for entries in groups:
        for e in entries:
            into = merged.get((e.tenant, e.fingerprint))
            if into is None:
                merged[e.tenant, e.fingerprint] = QueryStat(
                    e.tenant, e.fingerprint, e.query, e.calls, e.total_seconds, e.max_seconds,
                    e.rows, e.errors, dict(e.roles),
                )  # fmt: skip
                continue
            into.calls += e.calls
            into.total_seconds += e.total_seconds
            into.max_seconds = max(into.max_seconds, e.max_seconds)
            into.rows += e.rows
            into.errors += e.errors
            for role, n in e.roles.items():
                into.roles[role] = into.roles.get(role, 0) + n
    return sorted(merged.values(), key=lambda e: e.total_seconds, reverse=True)


async def all_workers_queries(
    slot: WorkerSlot, own: list[QueryStat], evicted: int, slow_queries: int, tenant_id: str | None
) -> tuple[list[QueryStat], int, int]:
    """Worker ``slot``'s query statistics merged with its siblings': the entries, and the
    evicted and slow-query counts added up (a worker that does not answer is left out)."""
    from router.workers.control import sibling_queries

    groups = [own]
    for answer in await sibling_queries(slot, tenant_id):
        if answer is None:
            continue
        groups.append([QueryStat(**entry) for entry in answer["queries"]])
        evicted += answer["evicted"]
        slow_queries += answer["slow_queries"]
    return merge_query_stats(groups), evicted, slow_queries


def merge_tenant_status(statuses: Iterable[dict]) -> dict:
    """Several workers' TenantManager.status() of one tenant, or Router.status(), as one (the
    first one's shape)."""
    statuses = list(statuses)
    merged = {**statuses[0], "clients": dict(statuses[0]["clients"])}
    merged["pools"] = {name: dict(stats) for name, stats in statuses[0]["pools"].items()}
    merged["nodes"] = [dict(node) for node in statuses[0]["nodes"]]
    nodes = {(n.get("cluster"), n["host"], n["port"]): n for n in merged["nodes"]}
    for other in statuses[1:]:
        if "paused" in merged:
            merged["paused"] = merged["paused"] or other["paused"]
        for key, n in other["clients"].items():
            merged["clients"][key] = merged["clients"].get(key, 0) + n
        for name, stats in other["pools"].items():
            into = merged["pools"].setdefault(name, dict.fromkeys(stats, 0))
            for key, n in stats.items():
                into[key] = into.get(key, 0) + n
        for node in other["nodes"]:
            mine = nodes.get((node.get("cluster"), node["host"], node["port"]))
            if mine is not None:
                mine["in_flight"] += node["in_flight"]
    return merged


async def all_workers_status(slot: WorkerSlot, own: dict, tenant_id: str) -> dict:
    """Worker ``slot``'s status of a tenant (or with an empty ``tenant_id``, of the router)
    merged with its siblings' (those that answer)."""
    from router.workers.control import sibling_statuses

    others = [status for status in await sibling_statuses(slot, tenant_id) if status is not None]
    return merge_tenant_status([own, *others])
