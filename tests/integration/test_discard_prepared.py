"""A client's DISCARD ALL / DEALLOCATE ALL drops the router-owned prepared statements on that
server connection too; the router must notice and prepare them again when needed."""

from __future__ import annotations

import psycopg
import pytest


@pytest.mark.parametrize("statement", ["DISCARD ALL", "deallocate   all", "DEALLOCATE PREPARE ALL"])
def test_statements_survive_a_clients_discard_all(start_router, statement):
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True, prepare_threshold=0) as conn:
        query = "SELECT %s::int * 2"
        assert conn.execute(query, (1,)).fetchone() == (2,)
        assert conn.execute(query, (2,)).fetchone() == (4,)  # prepared now, on the one server
        conn.execute(statement, prepare=False)
        assert conn.execute(query, (3,)).fetchone() == (6,)
        assert conn.execute(query, (4,)).fetchone() == (8,)
