"""Shared by the unmodified-client tests: a direct connection to the primary (to check what
really got committed, bypassing the router), a scratch table per test, and the pool check
every test ends with."""

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


def committed_ids(primary: psycopg.Connection, table: str) -> list[int]:
    """The ids the primary holds in ``table``: what was committed, whatever the router says."""
    return [row[0] for row in primary.execute(f"SELECT id FROM {table} ORDER BY id")]


def assert_pool_idle(router: RouterThread, timeout: float = 10.0) -> None:
    """Every server connection is back in its pool: no client holds one while idle."""
    router.wait_for(
        lambda r: all(p.stats()["active"] == 0 for p in r.pools.pools.values()),
        timeout=timeout,
        what=f"all server connections idle in their pool (stats: {router.pool_stats()})",
    )


def client_env(**extra: str) -> dict[str, str]:
    """Environment for psql/pgbench: none of the caller's PG* variables (PGHOST, PGOPTIONS,
    PGSSLMODE...), which would change what the client does, and C messages to parse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return env | {"LC_ALL": "C", "LANG": "C"} | extra
