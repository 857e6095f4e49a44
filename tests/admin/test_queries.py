"""Query statistics, the slow-query log and the hot path's metrics through a real router:
psql-like traffic from psycopg (simple and extended protocol) and asyncpg, a cluster with two
replicas for the node roles, GET /queries and GET /tenants/{id}/queries, and /metrics parsed
with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import asyncpg
import psycopg
import pytest
from pglast import parser

from router.logs import JsonFormatter
from tests.admin.conftest import CLIENT_PASSWORD, AdminAPI, tenant_body
from tests.admin.test_metrics import _samples
from tests.cluster import Cluster


def _queries(admin: AdminAPI, path: str = "/queries", **params) -> dict:
    response = admin.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _entry(view: dict, sql: str, tenant: str) -> dict:
    fp = parser.fingerprint(sql)
    (entry,) = [q for q in view["queries"] if q["fingerprint"] == fp and q["tenant"] == tenant]
    return entry


def test_calls_are_counted_per_tenant_and_fingerprint(start_admin: Callable[..., AdminAPI], cluster: Cluster) -> None:
    admin = start_admin(split=True)
    assert admin.post("/tenants", json=tenant_body(cluster, "acme")).status_code == 201
    handle = admin.handle
    with psycopg.connect(handle.dsn("alice", CLIENT_PASSWORD, "acme"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS qstats (id int PRIMARY KEY, secret text)")
        conn.execute("TRUNCATE qstats")
        for i in range(5):  # simple protocol, a new literal each time: one fingerprint
            conn.execute(f"INSERT INTO qstats VALUES ({i}, 'secret-{i}')", prepare=False)
        for i in range(3):  # extended protocol with a parameter
            conn.execute("SELECT secret FROM qstats WHERE id < %s", (i + 2,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table WHERE id = 7")
        with conn.transaction():  # explicit transaction: primary
            conn.execute("SELECT count(*) FROM qstats WHERE id > 0")
    # The file's database (no tenant; its statistics are under its database name) is on the
    # cluster with replicas: each call's role is the node it ran on.
    with psycopg.connect(handle.dsn("alice", "alice-pw", "app"), autocommit=True) as conn:
        on_replica = sum(conn.execute("SELECT pg_is_in_recovery()", prepare=False).fetchone()[0] for _ in range(6))

    view = _queries(admin)
    assert view["max_entries"] == 1000
    insert = _entry(view, "INSERT INTO qstats VALUES (0, 'x')", "acme")
    assert insert["calls"] == 5 and insert["rows"] == 5 and insert["errors"] == 0
    assert insert["roles"] == {"primary": 5}
    assert insert["query"] == "INSERT INTO qstats VALUES ($1, $2)"
    assert "secret-" not in json.dumps(view)  # constants never leave the router
    assert 0 < insert["mean_ms"] <= insert["max_ms"] <= insert["total_ms"]

    select = _entry(view, "SELECT secret FROM qstats WHERE id < $1", "acme")
    assert select["calls"] == 3
    assert select["rows"] == 2 + 3 + 4
    assert select["roles"] == {"primary": 3}  # the tenant's cluster has no replicas

    error = _entry(view, "SELECT * FROM no_such_table WHERE id = 1", "acme")
    assert error["calls"] == 1 and error["errors"] == 1 and error["rows"] == 0

    in_tx = _entry(view, "SELECT count(*) FROM qstats WHERE id > 0", "acme")
    assert in_tx["roles"] == {"primary": 1} and in_tx["rows"] == 1

    recovery = _entry(view, "SELECT pg_is_in_recovery()", "app")
    assert recovery["calls"] == 6
    assert recovery["roles"].get("replica", 0) == on_replica
    assert recovery["roles"].get("primary", 0) == 6 - on_replica

    # Largest total time first; limit; one tenant's.
    totals = [q["total_ms"] for q in view["queries"]]
    assert totals == sorted(totals, reverse=True)
    assert len(_queries(admin, limit=2)["queries"]) == 2
    acme = _queries(admin, "/tenants/acme/queries")["queries"]
    assert acme and {q["tenant"] for q in acme} == {"acme"}
    assert _queries(admin, "/tenants/app/queries")["queries"][0]["tenant"] == "app"


def test_rows_exclude_the_replay_of_session_settings(start_admin: Callable[..., AdminAPI]) -> None:
    """Two clients with different startup settings take turns on one server connection, so
    each transaction first replays the client's settings (a set_config() SELECT per setting,
    whose replies are dropped): those are not the call's rows."""
    admin = start_admin(pool_size=1)
    handle = admin.handle
    dsn = handle.dsn("alice", "alice-pw", "app")
    with (psycopg.connect(dsn, autocommit=True, application_name="first") as a,
          psycopg.connect(dsn, autocommit=True, application_name="second", options="-c work_mem=8MB") as b):
        for _ in range(3):
            for conn in (a, b):
                assert len(conn.execute("SELECT generate_series(1, 3)", prepare=False).fetchall()) == 3
        assert b.execute("SHOW work_mem").fetchone()[0] == "8MB"  # the replay did run
    series = _entry(_queries(admin), "SELECT generate_series(1, 3)", "app")
    assert series["calls"] == 6 and series["rows"] == 6 * 3
    # A setting the server refuses on replay (its error is dropped with the rest of the
    # replay): the client's own statement still succeeds, and is not counted as an error.
    # (One fixed at connection start: an invalid value would fail the login, as on PostgreSQL.)
    with psycopg.connect(dsn, autocommit=True, options="-c log_connections=on") as bogus:
        assert bogus.execute("SELECT 2 + 2", prepare=False).fetchone() == (4,)
    sum_ = _entry(_queries(admin), "SELECT 2 + 2", "app")
    assert sum_["calls"] == 1 and sum_["errors"] == 0 and sum_["rows"] == 1


def test_query_endpoints_need_the_token_and_a_known_tenant(start_admin: Callable[..., AdminAPI]) -> None:
    admin = start_admin()
    assert admin.get("/queries", token=None).status_code == 401
    assert admin.get("/queries", token="wrong").status_code == 401
    assert admin.get("/tenants/nobody/queries").status_code == 404
    assert admin.get("/queries", params={"limit": 0}).status_code == 422
    off = start_admin(query_stats_max=0)
    assert off.get("/queries").status_code == 404
    assert off.handle.router.query_stats is None


def test_asyncpg_prepared_statements_are_attributed(start_admin: Callable[..., AdminAPI]) -> None:
    admin = start_admin(redis_url=None)

    async def run() -> None:
        conn = await asyncpg.connect(admin.handle.dsn("alice", "alice-pw", "app"))
        await conn.execute("CREATE TEMP TABLE qstats_many (n int)")  # pins: one server connection
        try:
            # A named, cached statement: Parse/Describe (no Sync) joins the first call, then
            # Bind/Execute/Sync. (fetch: fetchval's Execute asks for one row, and the server
            # then suspends the portal without a row count.)
            for i in range(4):
                assert await conn.fetch("SELECT $1::int + 1", i) == [(i + 1,)]
            await conn.executemany("INSERT INTO qstats_many VALUES ($1)", [(1,), (2,), (3,)])
        finally:
            await conn.close()

    asyncio.run(run())
    view = _queries(admin, "/tenants/app/queries")
    plus = _entry(view, "SELECT $1::int + 1", "app")
    assert plus["calls"] == 4 and plus["rows"] == 4
    many = _entry(view, "INSERT INTO qstats_many VALUES ($1)", "app")
    assert many["calls"] == 1 and many["rows"] == 3  # one pipeline, one Sync


def test_slow_queries_are_logged_redacted(
    start_admin: Callable[..., AdminAPI], caplog: pytest.LogCaptureFixture
) -> None:
    admin = start_admin(redis_url=None, slow_query_ms=250)
    with psycopg.connect(admin.handle.dsn("alice", "alice-pw", "app"), autocommit=True) as conn:
        # A new server backend's first statement reads its catalog caches: not what is timed.
        conn.execute("SELECT 1")
        with caplog.at_level(logging.WARNING, logger="pgrouter.queries"):
            conn.execute("SELECT pg_sleep(0.01), 'quick-secret'")
            conn.execute("SELECT pg_sleep(0.4), 'slow-secret'")
    records = [r for r in caplog.records if r.name == "pgrouter.queries"]
    assert len(records) == 1
    event = json.loads(JsonFormatter().format(records[0]))
    assert event["event"] == "slow_query" and event["level"] == "WARNING"
    assert event["tenant"] == "app"
    assert event["duration_ms"] >= 400
    assert event["fingerprint"] == parser.fingerprint("SELECT pg_sleep(1), 'x'")
    assert event["role"] == "primary"
    assert event["node"].endswith(f":{admin.handle.router.settings.clusters['main'].primary.port}")
    line = json.dumps(event)
    assert "slow-secret" not in line and "0.4" not in event["query"] and "pg_sleep" in event["query"]
    assert _queries(admin)["slow_queries"] == 1


def test_metrics_count_transactions_and_errors_by_class(start_admin: Callable[..., AdminAPI]) -> None:
    admin = start_admin(redis_url=None)

    def scrape() -> dict:
        return _samples(admin.get("/metrics", token=None).text)

    before = scrape()
    count_before = before["pgrouter_transaction_duration_seconds_count"][0][1]
    with psycopg.connect(admin.handle.dsn("alice", "alice-pw", "app"), autocommit=True) as conn:
        for _ in range(5):
            conn.execute("SELECT 1")
        with conn.transaction():
            conn.execute("SELECT 1")
            conn.execute("SELECT 2")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM missing_table")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 2/0")
    after = scrape()
    # 5 autocommit statements, 1 transaction block, 3 failed autocommit statements.
    assert after["pgrouter_transaction_duration_seconds_count"][0][1] - count_before == 9
    buckets = {labels["le"]: value for labels, value in after["pgrouter_transaction_duration_seconds_bucket"]}
    assert buckets["+Inf"] == after["pgrouter_transaction_duration_seconds_count"][0][1]
    assert after["pgrouter_transaction_duration_seconds_sum"][0][1] > 0
    errors = {labels["class"]: value for labels, value in after["pgrouter_client_errors_total"]}
    assert errors["42"] == 1 and errors["22"] == 2
    # The router's own errors count too: a wrong password is class 28.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(admin.handle.dsn("alice", "wrong", "app")).close()
    errors = {labels["class"]: value for labels, value in scrape()["pgrouter_client_errors_total"]}
    assert errors["28"] == 1
