"""Which max_db_connections cap a real database gets (PoolManager._max_db_connections): the
global setting, a [databases] entry's own, the smallest of several entries naming one real
database, the wildcard entry's for a database no entry names."""

from __future__ import annotations

import pytest

from router.config import Settings
from router.pools.manager import PoolManager


def _manager(global_cap: int, databases: dict) -> PoolManager:
    return PoolManager(
        Settings(
            max_db_connections=global_cap,
            clusters={"main": {"primary": {"host": "127.0.0.1", "port": 5432}}},
            databases={name: {"cluster": "main", **entry} for name, entry in databases.items()},
        )
    )


@pytest.mark.parametrize(
    ("global_cap", "databases", "dbname", "expected"),
    [
        (0, {}, "app", 0),  # no cap anywhere
        (5, {}, "tenant_db", 5),  # a database no entry names (a registry tenant's): the global
        (5, {"app": {}}, "app", 5),  # an entry without its own: the global
        (5, {"app": {"max_db_connections": 2}}, "app", 2),
        (0, {"app": {"max_db_connections": 2}}, "app", 2),  # its own, with no global cap
        (5, {"app": {"max_db_connections": 0}}, "app", 0),  # its own: no cap
        (5, {"a": {"dbname": "app", "max_db_connections": 3}, "b": {"dbname": "app"}}, "app", 3),
        (2, {"a": {"dbname": "app", "max_db_connections": 3}, "b": {"dbname": "app"}}, "app", 2),
        (0, {"a": {"dbname": "app", "max_db_connections": 0}, "b": {"dbname": "app", "max_db_connections": 4}}, "app", 4),
        (5, {"app": {"max_db_connections": 2}}, "other", 5),  # another database: the global
        (5, {"*": {"max_db_connections": 1}}, "anything", 1),  # the wildcard entry's
        (5, {"*": {"max_db_connections": 1}, "app": {}}, "app", 5),  # a named entry wins
    ],
)
def test_max_db_connections_of_a_database(global_cap, databases, dbname, expected) -> None:
    assert _manager(global_cap, databases)._max_db_connections(dbname) == expected
