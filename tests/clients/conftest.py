"""Shared by the unmodified-client tests: a direct connection to the primary (to check what
really got committed, bypassing the router), a scratch table per test, the large result both
drivers fetch, and the checks that no idle client keeps a server connection."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.cluster import Cluster
from tests.harness import RouterThread


@pytest.fixture
def primary(cluster: Cluster) -> Iterator[psycopg.Connection]:
    """Autocommit connection straight to the primary's `app` database."""
    with psycopg.connect(cluster.primary.dsn("app"), autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(primary: psycopg.Connection) -> Iterator[str]:
    """A fresh table `(id int primary key, note text)`, dropped afterwards."""
    name = f"clients_{uuid.uuid4().hex[:12]}"
    primary.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    yield name
    primary.execute(f"DROP TABLE IF EXISTS {name}")


# The large result: 200k rows of ~520 bytes, ~100 MB on the wire, and the md5 the server
# computes over the same rows joined as "i:text,i:text,...".
LARGE_ROWS = 200_000
LARGE_QUERY = f"SELECT i, repeat(md5(i::text), 16) FROM generate_series(1, {LARGE_ROWS}) AS i"
LARGE_DIGEST = (
    "SELECT md5(string_agg(i || ':' || repeat(md5(i::text), 16), ',' ORDER BY i)) "
    f"FROM generate_series(1, {LARGE_ROWS}) AS i"
)


def committed_ids(primary: psycopg.Connection, table: str) -> list[int]:
    """The ids the primary holds in ``table``: what was committed, whatever the router says."""
    return [row[0] for row in primary.execute(f"SELECT id FROM {table} ORDER BY id")]


def assert_pool_idle(router: RouterThread, timeout: float = 10.0) -> None:
    """Every server connection is back in its pool: no client holds one while idle."""
    try:
        router.wait_for(
            lambda r: all(p.stats()["active"] == 0 for p in r.pools.pools.values()),
            timeout=timeout,
            what="every server connection idle in its pool",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; pool stats now: {router.pool_stats()}") from None


def assert_server_free_for_others(router: RouterThread) -> None:
    """Another client gets the pool's connection, then every server connection is idle.
    For a router with pool_size=1 and a short query_wait_timeout: the other client's query
    fails with 53300 if an idle client still holds the only server connection."""
    with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
        assert other.execute("SELECT 'served'").fetchone() == ("served",)
    assert_pool_idle(router, timeout=2)


def client_env(**extra: str) -> dict[str, str]:
    """Environment for psql/pgbench: none of the caller's PG* variables (PGHOST, PGOPTIONS,
    PGSSLMODE...), which would change what the client does, and C messages to parse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return env | {"LC_ALL": "C", "LANG": "C"} | extra
