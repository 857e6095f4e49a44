"""Function catalogs loaded from a real database's pg_proc (router/topology/catalog.py).

Each test creates a database of its own (unique name) on the session cluster's primary, with
functions of each volatility, and checks the verdicts the classifier gives with the loaded
catalog. Waiting is done by polling a condition with a deadline, never by sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import pytest

from router.routing.classify import ClassifierCache, classify
from router.routing.functions import IMMUTABLE, STABLE, VOLATILE, FunctionCatalog, builtin_rows
from router.routing.verdict import Reason, Target
from router.topology.catalog import (
    APPLICATION_NAME,
    ConnectParams,
    FunctionCatalogs,
    fetch_function_rows,
    load_function_catalog,
)
from tests.cluster import Cluster, free_port

FUNCTIONS_SQL = """
CREATE FUNCTION f_vol() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
CREATE FUNCTION f_stable() RETURNS int LANGUAGE sql STABLE AS 'SELECT 2';
CREATE FUNCTION f_imm() RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 3';
"""

PRIMARY_VOLATILE = (Target.PRIMARY, Reason.VOLATILE_FUNCTION)
PRIMARY_UNKNOWN = (Target.PRIMARY, Reason.UNKNOWN_FUNCTION)
REPLICA = (Target.REPLICA, Reason.READ)

RANK = {IMMUTABLE: 0, STABLE: 1, VOLATILE: 2}

DEADLINE = 10.0  # seconds any awaited condition gets on a loaded test machine


def route(sql: str, catalog: FunctionCatalog) -> tuple[Target, Reason]:
    verdict = classify(sql, catalog).verdict
    return verdict.target, verdict.reason


async def eventually(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def database(cluster: Cluster) -> Iterator[str]:
    """A fresh database holding f_vol (volatile), f_stable and f_imm."""
    name = f"fncat_{uuid.uuid4().hex[:12]}"
    cluster.psql(f"CREATE DATABASE {name}")
    try:
        cluster.psql(FUNCTIONS_SQL, dbname=name)
        yield name
    finally:
        cluster.psql(f"DROP DATABASE {name} WITH (FORCE)")


def params_for(cluster: Cluster, database: str) -> ConnectParams:
    return ConnectParams(cluster.primary.host, cluster.primary.port, database, "postgres")


@pytest.fixture
async def make_catalogs() -> AsyncIterator[Callable[..., FunctionCatalogs]]:
    """Build FunctionCatalogs (started unless start=False); all are stopped after the test."""
    made: list[FunctionCatalogs] = []

    def make(*, start: bool = True, **kwargs) -> FunctionCatalogs:
        kwargs = {"min_reload_interval": 0.05, "load_timeout": 5.0, **kwargs}
        catalogs = FunctionCatalogs(**kwargs)
        if start:
            catalogs.start()
        made.append(catalogs)
        return catalogs

    yield make
    for catalogs in made:
        await catalogs.stop()


# -- load_function_catalog -------------------------------------------------------------


async def test_loaded_catalog_routes_by_volatility(cluster: Cluster, database: str) -> None:
    # A password login (scram) on purpose: the credentials must reach the server.
    catalog = await load_function_catalog(
        host=cluster.primary.host,
        port=cluster.primary.port,
        database=database,
        user="pgr_scram",
        password="scram-pw",
        timeout=5.0,
    )
    assert route("select f_vol()", catalog) == PRIMARY_VOLATILE
    assert route("select f_stable()", catalog) == REPLICA
    assert route("select f_imm()", catalog) == REPLICA
    assert route("select public.f_stable()", catalog) == REPLICA
    assert route("select f_missing()", catalog) == PRIMARY_UNKNOWN
    # the same statements with the fallback catalog: user functions are unknown there
    builtin = FunctionCatalog.builtin()
    assert route("select f_stable()", builtin) == PRIMARY_UNKNOWN


async def test_loaded_catalog_keeps_builtin_knowledge(cluster: Cluster, database: str) -> None:
    catalog = await load_function_catalog(
        host=cluster.primary.host,
        port=cluster.primary.port,
        database=database,
        user="postgres",
        timeout=5.0,
    )
    # rules by name hold whatever pg_proc says (advisory locks are volatile there anyway)
    assert route("select pg_advisory_lock(1)", catalog) == (Target.PRIMARY, Reason.ADVISORY_LOCK)
    assert route("select nextval('s')", catalog) == (Target.PRIMARY, Reason.NEXTVAL)
    assert route("select txid_current()", catalog) == (Target.PRIMARY, Reason.WRITER_FUNCTION)
    assert route("select random(), now(), lower('A')", catalog) == REPLICA
    # The merge: every name the fallback knows stays known, never less volatile than there,
    # also those this server lacks (uuidv7 before PostgreSQL 18).
    for schema, name, volatility in builtin_rows():
        loaded = catalog.volatility(name, schema)
        assert loaded is not None, f"{schema}.{name} lost"
        assert RANK[loaded] >= RANK[volatility], f"{schema}.{name}: {loaded} < {volatility}"


async def test_functions_in_other_schemas(cluster: Cluster, database: str) -> None:
    cluster.psql(
        """
        CREATE SCHEMA billing;
        CREATE FUNCTION billing.f_charge() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
        CREATE FUNCTION billing.f_rate() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';
        CREATE FUNCTION public.f_dup() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';
        CREATE FUNCTION billing.f_dup() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
        """,
        dbname=database,
    )
    catalog = await load_function_catalog(
        host=cluster.primary.host,
        port=cluster.primary.port,
        database=database,
        user="postgres",
        timeout=5.0,
    )
    assert route("select billing.f_charge()", catalog) == PRIMARY_VOLATILE
    assert route("select billing.f_rate()", catalog) == REPLICA
    assert route("select billing.f_nope()", catalog) == PRIMARY_UNKNOWN
    assert route("select billing.f_stable()", catalog) == PRIMARY_UNKNOWN  # it is in public
    assert route("select public.f_dup()", catalog) == REPLICA
    assert route("select billing.f_dup()", catalog) == PRIMARY_VOLATILE
    # bare: the search_path is unknown, so the most volatile of all schemas decides
    assert route("select f_dup()", catalog) == PRIMARY_VOLATILE


async def test_overloads_most_volatile_wins(cluster: Cluster, database: str) -> None:
    cluster.psql(
        """
        CREATE FUNCTION f_over(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 1';
        CREATE FUNCTION f_over(text) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
        """,
        dbname=database,
    )
    catalog = await load_function_catalog(
        host=cluster.primary.host,
        port=cluster.primary.port,
        database=database,
        user="postgres",
        timeout=5.0,
    )
    assert route("select f_over(1)", catalog) == PRIMARY_VOLATILE


async def test_load_closes_its_connection(cluster: Cluster, database: str) -> None:
    rows = await fetch_function_rows(params_for(cluster, database), timeout=5.0)
    assert ("public", "f_imm", "i", False) in rows and ("pg_catalog", "now", "s", False) in rows
    sql = (
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE application_name = '{APPLICATION_NAME}' AND datname = '{database}'"
    )
    # the backend exits shortly after the client's Terminate
    await eventually(lambda: cluster.psql(sql) == "0", "the catalog connection to close")


# -- FunctionCatalogs ------------------------------------------------------------------


async def test_builtin_until_first_load(cluster: Cluster, database: str, make_catalogs) -> None:
    catalogs = make_catalogs(start=False)
    key = ("primary", database)
    catalogs.register(key, params_for(cluster, database))
    assert catalogs.get(key) is catalogs.builtin
    assert route("select f_stable()", catalogs.get(key)) == PRIMARY_UNKNOWN

    catalogs.start()
    loaded = await catalogs.wait_loaded(key, timeout=DEADLINE)
    assert catalogs.get(key) is loaded and loaded is not catalogs.builtin
    assert route("select f_stable()", catalogs.get(key)) == REPLICA
    assert route("select f_vol()", catalogs.get(key)) == PRIMARY_VOLATILE
    assert catalogs.get(("primary", "not registered")) is catalogs.builtin

    await catalogs.forget(key)
    assert catalogs.get(key) is catalogs.builtin


async def test_invalidate_loads_a_new_function(
    cluster: Cluster, database: str, make_catalogs
) -> None:
    catalogs = make_catalogs(refresh_interval=600)  # only invalidate() can bring it in time
    key = ("primary", database)
    catalogs.register(key, params_for(cluster, database))
    old = await catalogs.wait_loaded(key, timeout=DEADLINE)
    assert route("select f_new()", old) == PRIMARY_UNKNOWN

    cluster.psql(
        "CREATE FUNCTION f_new() RETURNS int LANGUAGE sql STABLE AS 'SELECT 4'", dbname=database
    )
    catalogs.invalidate(key)
    await eventually(lambda: catalogs.get(key) is not old, "a new catalog object")
    assert route("select f_new()", catalogs.get(key)) == REPLICA
    assert route("select f_new()", old) == PRIMARY_UNKNOWN  # the old object is unchanged


async def test_refresh_timer_picks_up_alter_volatility(
    cluster: Cluster, database: str, make_catalogs
) -> None:
    catalogs = make_catalogs(refresh_interval=0.3)  # no invalidate() in this test
    key = ("primary", database)
    catalogs.register(key, params_for(cluster, database))
    old = await catalogs.wait_loaded(key, timeout=DEADLINE)
    cache = ClassifierCache()
    assert cache.classify("select f_stable()", catalogs.get(key)).verdict.target is Target.REPLICA

    cluster.psql("ALTER FUNCTION f_stable() VOLATILE", dbname=database)
    await eventually(lambda: catalogs.get(key) is not old, "the refreshed catalog")
    # the cache entry made with the old catalog is not reused for the new one
    verdict = cache.classify("select f_stable()", catalogs.get(key)).verdict
    assert (verdict.target, verdict.reason) == PRIMARY_VOLATILE


async def test_unchanged_reload_keeps_the_catalog_object(
    cluster: Cluster, database: str, make_catalogs
) -> None:
    # A new object would make every cached classification of this database a miss.
    catalogs = make_catalogs(refresh_interval=600)
    key = ("primary", database)
    catalogs.register(key, params_for(cluster, database))
    loaded = await catalogs.wait_loaded(key, timeout=DEADLINE)
    loads = catalogs.stats(key).loads

    catalogs.invalidate(key)
    await eventually(lambda: catalogs.stats(key).loads > loads, "a reload")
    assert catalogs.get(key) is loaded
    assert catalogs.stats(key).replacements == 1


async def test_identical_databases_share_one_catalog(
    cluster: Cluster, database: str, make_catalogs
) -> None:
    catalogs = make_catalogs()
    params = params_for(cluster, database)
    catalogs.register("tenant-a", params)
    catalogs.register("tenant-b", params)
    a = await catalogs.wait_loaded("tenant-a", timeout=DEADLINE)
    b = await catalogs.wait_loaded("tenant-b", timeout=DEADLINE)
    assert a is b


async def test_burst_of_invalidations_loads_at_most_twice(
    cluster: Cluster, database: str, make_catalogs
) -> None:
    catalogs = make_catalogs(refresh_interval=600, min_reload_interval=1.0)
    key = ("primary", database)
    catalogs.register(key, params_for(cluster, database))
    await catalogs.wait_loaded(key, timeout=DEADLINE)
    before = catalogs.stats(key).attempts

    # Spread over ~0.3 s, longer than one load, so that loads would run during the burst if
    # invalidations were not coalesced and rate-limited.
    for _ in range(100):
        catalogs.invalidate(key)
        await asyncio.sleep(0.003)

    def settled() -> bool:
        stats = catalogs.stats(key)
        return stats.attempts > before and not stats.pending and not stats.loading

    await eventually(settled, "the reloads the burst asked for")
    assert 1 <= catalogs.stats(key).attempts - before <= 2
    assert catalogs.stats(key).failures == 0


async def test_unreachable_database_keeps_builtin_and_logs(
    cluster: Cluster, database: str, make_catalogs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="router.topology.catalog")
    catalogs = make_catalogs(retry_interval=0.1)
    dead_port = free_port()  # nothing listens there
    bad = ("dead", database)
    good = ("primary", database)
    catalogs.register(bad, replace(params_for(cluster, database), port=dead_port))
    catalogs.register(good, params_for(cluster, database))

    await eventually(lambda: catalogs.stats(bad).failures >= 2, "two failed loads (a retry)")
    assert catalogs.get(bad) is catalogs.builtin
    assert catalogs.stats(bad).loads == 0 and catalogs.stats(bad).last_error
    errors = [
        r for r in caplog.records if r.levelno == logging.ERROR and str(dead_port) in r.message
    ]
    assert errors, caplog.text
    with pytest.raises(TimeoutError):
        await catalogs.wait_loaded(bad, timeout=0.2)
    # a failing database does not hold up the others
    good_catalog = await catalogs.wait_loaded(good, timeout=DEADLINE)
    assert route("select f_stable()", good_catalog) == REPLICA


async def test_failed_reload_keeps_previous_catalog(
    cluster: Cluster, database: str, make_catalogs
) -> None:
    catalogs = make_catalogs(refresh_interval=600)
    key = ("primary", database)
    params = params_for(cluster, database)
    catalogs.register(key, params)
    loaded = await catalogs.wait_loaded(key, timeout=DEADLINE)

    # the same database moved to a port where nothing answers: re-registering reloads it
    catalogs.register(key, replace(params, port=free_port()))
    await eventually(lambda: catalogs.stats(key).failures >= 1, "a failed reload")
    assert catalogs.get(key) is loaded
    assert route("select f_stable()", catalogs.get(key)) == REPLICA


async def test_locate_names_the_node_at_each_load(
    cluster: Cluster, database: str, make_catalogs
) -> None:
    # As for a cluster that failed over: the configured node is gone, locate() names another.
    catalogs = make_catalogs(refresh_interval=600)
    key = ("primary", database)
    dead = replace(params_for(cluster, database), port=free_port())
    where = [(dead.host, dead.port)]
    catalogs.register(key, dead, locate=lambda: where[-1])
    await eventually(lambda: catalogs.stats(key).failures >= 1, "a failed load from the dead node")
    assert catalogs.stats(key).source == (dead.host, dead.port)

    where.append((cluster.primary.host, cluster.primary.port))
    catalogs.invalidate(key)
    loaded = await catalogs.wait_loaded(key, timeout=DEADLINE)
    assert catalogs.stats(key).source == where[-1]
    assert route("select f_stable()", loaded) == REPLICA


async def test_a_new_server_password_reaches_the_catalog(cluster: Cluster, database: str, make_catalogs) -> None:
    """set_password (a reload rotating a database's server password): a catalog that failed
    with the old one loads with the new one; one read as another user is left alone."""
    catalogs = make_catalogs(retry_interval=0.1)
    key = ("primary", database)
    params = replace(params_for(cluster, database), user="pgr_scram", password="old-pw")
    catalogs.register(key, params)
    await eventually(lambda: catalogs.stats(key).failures >= 1, "a failed load with the old password")
    catalogs.set_password(key, "someone_else", "scram-pw")
    with pytest.raises(TimeoutError):
        await catalogs.wait_loaded(key, timeout=0.3)
    catalogs.set_password(key, "pgr_scram", "scram-pw")
    loaded = await catalogs.wait_loaded(key, timeout=DEADLINE)
    assert route("select f_stable()", loaded) == REPLICA
