"""Multi-core pieces that need no process: how limits are split between workers, which worker
issued a cancel key, and how several workers' /metrics merge into one."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from router.admin.aggregate import (
    MAX_GAUGES,
    MIN_GAUGES,
    merge,
    merge_query_stats,
    merge_tenant_status,
    render,
)
from router.config import Settings
from router.frontend.cancel import MAX_PID, decode_relayed, encode_relayed, issue_pid
from router.stats.queries import QueryStat
from router.workers.shares import WorkerSlot, share


def slot(index: int, count: int, port: int = 7000, configured: int = 0) -> WorkerSlot:
    return WorkerSlot(index, count, Path("/nonexistent"), port, configured)


@pytest.mark.parametrize(
    ("total", "count", "parts"),
    [
        (10, 3, [4, 3, 3]),
        (20, 2, [10, 10]),
        (1, 4, [1, 0, 0, 0]),
        (0, 3, [0, 0, 0]),
        (7, 1, [7]),
    ],
)
def test_share_splits_a_total(total: int, count: int, parts: list[int]) -> None:
    assert [share(total, i, count) for i in range(count)] == parts


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_shares_add_up_to_the_total(total: int, count: int) -> None:
    parts = [share(total, i, count) for i in range(count)]
    assert sum(parts) == total
    assert max(parts) - min(parts) <= 1


def test_share_rejects_an_index_out_of_range() -> None:
    with pytest.raises(ValueError):
        share(10, 3, 3)


def test_worker_settings_take_their_part() -> None:
    settings = Settings(
        pool_size=10, min_pool_size=3, max_client_conn=5, listen_port=0, admin_port=8080,
        clusters={"main": {"primary": {"host": "h"}}},
        databases={"app": {"cluster": "main", "pool_size": 3}, "other": {"cluster": "main"}},
    )  # fmt: skip
    parts = [slot(i, 3, port=7000).settings_for(settings) for i in range(3)]
    assert [p.pool_size for p in parts] == [4, 3, 3]
    assert [p.min_pool_size for p in parts] == [1, 1, 1]
    assert [p.max_client_conn for p in parts] == [2, 2, 1]
    assert [p.databases["app"].pool_size for p in parts] == [1, 1, 1]
    assert all(p.databases["other"].pool_size is None for p in parts)  # follows pool_size
    assert [p.listen_port for p in parts] == [7000, 7000, 7000]  # the port worker 0 got
    assert [p.admin_port for p in parts] == [8080, -1, -1]  # the admin API on worker 0 only
    assert settings.pool_size == 10  # the original is left alone


def test_caps_and_reserves_are_split_too() -> None:
    """max_db_connections / max_user_connections, reserve_pool_size and a database's
    min_pool_size are for the whole router, as pool_size is: each worker gets its part (a cap
    at least 1, 0 stays no cap)."""
    settings = Settings(
        max_db_connections=10, max_user_connections=0, reserve_pool_size=3,
        clusters={"main": {"primary": {"host": "h"}}},
        databases={"app": {"cluster": "main", "max_db_connections": 4, "reserve_pool_size": 1, "min_pool_size": 2},
                   "other": {"cluster": "main", "max_db_connections": 0}},
    )  # fmt: skip
    parts = [slot(i, 3).settings_for(settings) for i in range(3)]
    assert [p.max_db_connections for p in parts] == [4, 3, 3]
    assert [p.max_user_connections for p in parts] == [0, 0, 0]
    assert [p.reserve_pool_size for p in parts] == [1, 1, 1]
    assert [p.databases["app"].max_db_connections for p in parts] == [2, 1, 1]
    assert [p.databases["app"].reserve_pool_size for p in parts] == [1, 0, 0]
    assert [p.databases["app"].min_pool_size for p in parts] == [1, 1, 0]
    assert [p.databases["other"].max_db_connections for p in parts] == [0, 0, 0]
    assert all(p.databases["other"].reserve_pool_size is None for p in parts)  # follows the global


def test_a_limit_below_the_worker_count_still_gives_each_worker_one() -> None:
    settings = Settings(pool_size=2, max_client_conn=1)
    parts = [slot(i, 4).settings_for(settings) for i in range(4)]
    assert [p.pool_size for p in parts] == [1, 1, 1, 1]
    assert [p.max_client_conn for p in parts] == [1, 1, 1, 1]
    assert [p.min_pool_size for p in parts] == [0, 0, 0, 0]


def test_a_changed_port_is_kept_so_that_reload_reports_it() -> None:
    worker = slot(1, 2, port=7000, configured=0)
    assert worker.settings_for(Settings(listen_port=0)).listen_port == 7000
    assert worker.settings_for(Settings(listen_port=6500)).listen_port == 6500


@given(st.integers(1, 16).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_issued_pids_name_their_worker(case: tuple[int, int]) -> None:
    count, index = case
    pid = issue_pid(index, count, lambda _pid: False)
    assert 0 < pid <= MAX_PID
    assert slot(index, count).owner_of(pid) == index


def test_issue_pid_skips_taken_ids() -> None:
    seen: set[int] = set()
    for _ in range(50):
        seen.add(issue_pid(1, 2, seen.__contains__))
    assert len(seen) == 50


def test_relayed_cancel_round_trip_and_garbage() -> None:
    assert decode_relayed(encode_relayed(12345, 0xFFFFFFFF)) == (12345, 0xFFFFFFFF)
    for bad in ["", "{}", '{"pid": "1", "key": 2}', '{"pid": -1, "key": 2}', "[1, 2]", '{"pid": 1}']:
        with pytest.raises(ValueError):
            decode_relayed(bad)


# --- merging /metrics ---------------------------------------------------------------------

WORKER_0 = """\
# HELP pgrouter_client_connections Client connections by tenant and state
# TYPE pgrouter_client_connections gauge
pgrouter_client_connections{state="active",tenant=""} 2.0
pgrouter_client_connections{state="idle",tenant=""} 1.0
# HELP pgrouter_cancel_requests_total CancelRequests received
# TYPE pgrouter_cancel_requests_total counter
pgrouter_cancel_requests_total{outcome="local"} 3.0
pgrouter_cancel_requests_total{outcome="forwarded"} 1.0
# HELP pgrouter_replica_lag_seconds Replication lag
# TYPE pgrouter_replica_lag_seconds gauge
pgrouter_replica_lag_seconds{cluster="main",node="r1:5433"} 0.5
pgrouter_replica_lag_seconds{cluster="main",node="r2:5434"} +Inf
# HELP pgrouter_node_up 1 if the node answered its last health check
# TYPE pgrouter_node_up gauge
pgrouter_node_up{cluster="main",node="p:5432",role="primary"} 1.0
pgrouter_node_up{cluster="main",node="r1:5433",role="replica"} 1.0
# HELP pgrouter_pool_wait_seconds Time a transaction waited
# TYPE pgrouter_pool_wait_seconds histogram
pgrouter_pool_wait_seconds_bucket{le="0.001"} 4.0
pgrouter_pool_wait_seconds_bucket{le="+Inf"} 5.0
pgrouter_pool_wait_seconds_count 5.0
pgrouter_pool_wait_seconds_sum 0.75
# HELP pgrouter_pool_wait_seconds_created Time a transaction waited
# TYPE pgrouter_pool_wait_seconds_created gauge
pgrouter_pool_wait_seconds_created 1.7e+09
"""

WORKER_1 = """\
# HELP pgrouter_client_connections Client connections by tenant and state
# TYPE pgrouter_client_connections gauge
pgrouter_client_connections{state="active",tenant=""} 1.0
pgrouter_client_connections{state="waiting",tenant=""} 4.0
# HELP pgrouter_cancel_requests_total CancelRequests received
# TYPE pgrouter_cancel_requests_total counter
pgrouter_cancel_requests_total{outcome="local"} 2.0
pgrouter_cancel_requests_total{outcome="unknown"} 1.0
# HELP pgrouter_replica_lag_seconds Replication lag
# TYPE pgrouter_replica_lag_seconds gauge
pgrouter_replica_lag_seconds{cluster="main",node="r1:5433"} 0.75
pgrouter_replica_lag_seconds{cluster="main",node="r2:5434"} 0.1
# HELP pgrouter_node_up 1 if the node answered its last health check
# TYPE pgrouter_node_up gauge
pgrouter_node_up{cluster="main",node="p:5432",role="primary"} 1.0
pgrouter_node_up{cluster="main",node="r1:5433",role="replica"} 0.0
# HELP pgrouter_pool_wait_seconds Time a transaction waited
# TYPE pgrouter_pool_wait_seconds histogram
pgrouter_pool_wait_seconds_bucket{le="0.001"} 1.0
pgrouter_pool_wait_seconds_bucket{le="+Inf"} 3.0
pgrouter_pool_wait_seconds_count 3.0
pgrouter_pool_wait_seconds_sum 2.25
# HELP pgrouter_pool_wait_seconds_created Time a transaction waited
# TYPE pgrouter_pool_wait_seconds_created gauge
pgrouter_pool_wait_seconds_created 1.6e+09
# HELP pgrouter_registry_stale 1 while the cache cannot vouch for its entries
# TYPE pgrouter_registry_stale gauge
pgrouter_registry_stale 1.0
"""


def series(text: str | bytes) -> dict[tuple[str, tuple], float]:
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_merge_adds_parts_and_keeps_the_worst_of_measurements() -> None:
    merged = series(render(merge([WORKER_0, WORKER_1])))
    tenant = ("tenant", "")
    assert merged["pgrouter_client_connections", (("state", "active"), tenant)] == 3
    assert merged["pgrouter_client_connections", (("state", "idle"), tenant)] == 1
    assert merged["pgrouter_client_connections", (("state", "waiting"), tenant)] == 4
    assert merged["pgrouter_cancel_requests_total", (("outcome", "local"),)] == 5
    assert merged["pgrouter_cancel_requests_total", (("outcome", "forwarded"),)] == 1
    assert merged["pgrouter_cancel_requests_total", (("outcome", "unknown"),)] == 1
    # Lag: the largest any worker measured; a node is up only if every worker reaches it.
    r1 = (("cluster", "main"), ("node", "r1:5433"))
    assert merged["pgrouter_replica_lag_seconds", r1] == 0.75
    assert merged["pgrouter_replica_lag_seconds", (("cluster", "main"), ("node", "r2:5434"))] == float("inf")
    assert merged["pgrouter_node_up", (*r1, ("role", "replica"))] == 0
    assert merged["pgrouter_node_up", (("cluster", "main"), ("node", "p:5432"), ("role", "primary"))] == 1
    # Histograms add bucket by bucket; a family only one worker has is kept as it is.
    assert merged["pgrouter_pool_wait_seconds_bucket", (("le", "0.001"),)] == 5
    assert merged["pgrouter_pool_wait_seconds_bucket", (("le", "+Inf"),)] == 8
    assert merged["pgrouter_pool_wait_seconds_count", ()] == 8
    assert merged["pgrouter_pool_wait_seconds_sum", ()] == 3.0
    assert merged["pgrouter_pool_wait_seconds_created", ()] == 1.6e9
    assert merged["pgrouter_registry_stale", ()] == 1


def test_merging_one_text_changes_nothing() -> None:
    assert series(render(merge([WORKER_0]))) == series(WORKER_0)


def test_merged_output_keeps_help_and_type() -> None:
    text = render(merge([WORKER_0, WORKER_1])).decode()
    assert "# TYPE pgrouter_cancel_requests_total counter" in text
    assert "# TYPE pgrouter_pool_wait_seconds histogram" in text
    assert "# HELP pgrouter_node_up 1 if the node answered its last health check" in text


def test_every_non_additive_gauge_is_a_gauge_the_router_reports() -> None:
    import inspect

    import router.admin.metrics as metrics

    source = inspect.getsource(metrics)
    for name in MAX_GAUGES | MIN_GAUGES:
        assert f'"{name}"' in source, f"{name} is listed in aggregate.py but not reported"


def test_a_worker_names_itself_in_its_log_events() -> None:
    import json
    import logging

    from router.logs import JsonFormatter

    record = logging.LogRecord("pgrouter", logging.INFO, __file__, 1, "hello", None, None)
    assert json.loads(JsonFormatter(worker=1).format(record))["worker"] == 1
    assert "worker" not in json.loads(JsonFormatter().format(record))


def test_query_statistics_merge_by_tenant_and_fingerprint() -> None:
    w0 = [
        QueryStat("acme", "f1", "SELECT $1", 3, 0.3, 0.2, 3, 0, {"primary": 3}),
        QueryStat("acme", "f2", "UPDATE t SET a = $1", 1, 0.05, 0.05, 1, 1, {"primary": 1}),
    ]
    w1 = [
        QueryStat("acme", "f1", "SELECT $1", 2, 0.5, 0.4, 2, 1, {"replica": 2}),
        QueryStat("globex", "f1", "SELECT $1", 1, 0.01, 0.01, 1, 0, {"replica": 1}),
    ]
    merged = merge_query_stats([w0, w1])
    assert [(e.tenant, e.fingerprint) for e in merged] == [("acme", "f1"), ("acme", "f2"), ("globex", "f1")]
    first = merged[0]
    assert (first.calls, first.rows, first.errors) == (5, 5, 1)
    assert first.total_seconds == pytest.approx(0.8) and first.max_seconds == 0.4
    assert first.roles == {"primary": 3, "replica": 2}
    assert w0[0].calls == 3 and w0[0].roles == {"primary": 3}  # the inputs are left alone


def test_tenant_status_adds_up_clients_and_pools() -> None:
    node = {"host": "p", "port": 5432, "role": "primary", "healthy": True, "in_flight": 1}
    w0 = {
        "tenant_id": "acme", "paused": False, "clients": {"total": 2, "active": 1, "waiting": 0},
        "pools": {"acme@p": {"servers": 2, "idle": 1, "active": 1, "connecting": 0, "waiting": 0}},
        "nodes": [node],
    }  # fmt: skip
    w1 = {
        "tenant_id": "acme", "paused": True, "clients": {"total": 3, "active": 2, "waiting": 1},
        "pools": {
            "acme@p": {"servers": 2, "idle": 0, "active": 2, "connecting": 0, "waiting": 1},
            "acme@r": {"servers": 1, "idle": 1, "active": 0, "connecting": 0, "waiting": 0},
        },
        "nodes": [{**node, "in_flight": 2}],
    }  # fmt: skip
    merged = merge_tenant_status([w0, w1])
    assert merged["clients"] == {"total": 5, "active": 3, "waiting": 1}
    assert merged["pools"]["acme@p"] == {"servers": 4, "idle": 1, "active": 3, "connecting": 0, "waiting": 1}
    assert merged["pools"]["acme@r"]["servers"] == 1
    assert merged["paused"] is True
    assert merged["nodes"] == [{**node, "in_flight": 3}]
    assert w0["clients"]["total"] == 2 and node["in_flight"] == 1  # the inputs are left alone
