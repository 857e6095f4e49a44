"""A client's DISCARD ALL / DEALLOCATE ALL drops the router-owned prepared statements on that
server connection too; the router must notice and prepare them again when needed."""

from __future__ import annotations

import psycopg
import pytest


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize("statement", ["DISCARD ALL", "deallocate   all", "DEALLOCATE PREPARE ALL"])
def test_statements_survive_a_clients_discard_all(start_router, statement, extended):
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True, prepare_threshold=0) as conn:
        query = "SELECT %s::int * 2"
        assert conn.execute(query, (1,)).fetchone() == (2,)
        assert conn.execute(query, (2,)).fetchone() == (4,)  # prepared now, on the one server
        if extended:
            # Pipeline mode sends it as an unnamed Parse/Bind/Execute/Sync (JDBC's way): the
            # router sees it when parsed.
            with conn.pipeline():
                conn.execute(statement, prepare=False)
        else:
            conn.execute(statement, prepare=False)  # a simple Query
        assert conn.execute(query, (3,)).fetchone() == (6,)
        assert conn.execute(query, (4,)).fetchone() == (8,)


@pytest.mark.parametrize(
    "sql",
    ["PREPARE q(int) AS SELECT $1", "  execute q(1)", "Deallocate q", "DEALLOCATE PREPARE q"],
)
def test_sql_level_prepare_is_refused_in_transaction_mode(router, sql):
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as exc:
            conn.execute(sql)
        assert "not supported in transaction pool mode" in str(exc.value)
        assert exc.value.diag.message_hint.startswith("Use your driver's prepared statements")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # Inside a transaction the refusal fails the transaction like any error.
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute(sql)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("ROLLBACK")


def test_sql_level_prepare_works_in_session_mode(start_router):
    router = start_router(pool_mode="session")
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("PREPARE q(int) AS SELECT $1 * 3")
        assert conn.execute("EXECUTE q(5)").fetchone() == (15,)
        conn.execute("DEALLOCATE q")


def test_prepare_transaction_and_deallocate_all_are_not_refused(router):
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("DEALLOCATE ALL")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            # Not refused by the router: the server answers (max_prepared_transactions = 0).
            conn.execute("BEGIN; PREPARE TRANSACTION 'x'")
