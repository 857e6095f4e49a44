"""[databases] entries that would meet in one pool must agree on what the pool takes from
its entry (Settings._check_shared_pools); entries that get pools of their own may differ."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.config import Settings

CLUSTERS = {
    "main": {"primary": {"host": "10.0.0.1", "port": 5432}, "replicas": [{"host": "10.0.0.2", "port": 5432}]},
    "reads": {"primary": {"host": "10.0.0.2", "port": 5432}},  # main's replica as a primary
    "other": {"primary": {"host": "10.0.0.3", "port": 5432}},
}
APP = {"cluster": "main", "server_user": "app"}

# (entries, the fields named in the error, or None: valid)
CASES = [
    ({"app": APP, "alias": {**APP, "dbname": "app", "pool_size": 3}}, "pool_size"),
    ({"app": {**APP, "pool_size": 3}, "alias": {**APP, "dbname": "app", "pool_size": 3}}, None),
    ({"app": {**APP, "pool_size": 20}, "alias": {**APP, "dbname": "app"}}, None),  # 20: the global default
    ({"app": APP, "alias": {**APP, "dbname": "app", "min_pool_size": 2, "query_wait_timeout": 5}},
     "min_pool_size, query_wait_timeout"),
    ({"app": APP, "alias": {**APP, "dbname": "app", "reserve_pool_size": 1}}, "reserve_pool_size"),
    ({"app": {**APP, "server_password": "a"}, "alias": {**APP, "dbname": "app", "server_password": "b"}},
     "server_password"),
    # A server user unset is the client's: it may be the other entry's.
    ({"app": APP, "alias": {"cluster": "main", "dbname": "app", "pool_size": 3}}, "pool_size"),
    # Pools of their own: another server user, real database, mode, server TLS or node.
    ({"app": APP, "alias": {**APP, "dbname": "app", "server_user": "other", "pool_size": 3}}, None),
    ({"app": APP, "alias": {**APP, "dbname": "app2", "pool_size": 3}}, None),
    ({"app": APP, "alias": {**APP, "dbname": "app", "pool_mode": "session", "pool_size": 3}}, None),
    ({"app": APP, "alias": {**APP, "dbname": "app", "server_tls": "require", "pool_size": 3}}, None),
    ({"app": APP, "alias": {**APP, "cluster": "other", "dbname": "app", "pool_size": 3}}, None),
    # A cluster whose primary is another's replica shares that node's pools.
    ({"app": APP, "alias": {**APP, "cluster": "reads", "dbname": "app", "pool_size": 3}}, "pool_size"),
    # The global pool_mode or server_tls, spelt out on one entry, is the other's too.
    ({"app": APP, "alias": {**APP, "dbname": "app", "pool_mode": "transaction", "pool_size": 3}}, "pool_size"),
    ({"app": APP, "alias": {**APP, "dbname": "app", "server_tls": "disable", "pool_size": 3}}, "pool_size"),
    # "*" serves the names no entry has: an entry's real name that is not itself an entry.
    ({"*": {**APP, "pool_size": 3}, "alias": {**APP, "dbname": "real"}}, "pool_size"),
    ({"*": {**APP, "pool_size": 3}, "app": APP}, None),
]


@pytest.mark.parametrize(("databases", "fields"), CASES)
def test_entries_sharing_a_pool_must_agree(databases: dict, fields: str | None) -> None:
    if fields is None:
        assert Settings(clusters=CLUSTERS, databases=databases).databases.keys() == databases.keys()
        return
    with pytest.raises(ValidationError) as exc:
        Settings(clusters=CLUSTERS, databases=databases)
    first, second = databases
    assert f"databases {first!r} and {second!r} share pools" in str(exc.value)
    assert f"differ in {fields}:" in str(exc.value)
