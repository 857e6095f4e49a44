"""A client's DISCARD ALL / DEALLOCATE ALL frees its own statement names, as on PostgreSQL,
and drops the router-owned prepared statements on that server connection too, which the
router must notice and prepare again for the other clients that use them."""

from __future__ import annotations

import asyncpg
import psycopg
import pytest

from tests.cluster import Cluster


def _outcome(conn: psycopg.Connection, statement: str, extended: bool) -> list:
    """What a client sees around its DISCARD/DEALLOCATE: a statement prepared before (psycopg,
    prepare_threshold=0, so named), then used again after."""
    query = "SELECT %s::int * 2"
    seen = [conn.execute(query, (1,)).fetchone(), conn.execute(query, (2,)).fetchone()]
    if extended:
        # Pipeline mode sends it as an unnamed Parse/Bind/Execute/Sync (JDBC's way), and
        # psycopg, not looking at its tag there, still takes its statement for prepared.
        with conn.pipeline():
            conn.execute(statement, prepare=False)
    else:
        conn.execute(statement, prepare=False)  # a simple Query: psycopg forgets its own too
    for i in (3, 4):
        try:
            seen.append(conn.execute(query, (i,)).fetchone())
        except psycopg.Error as exc:
            seen.append(exc.sqlstate)
    return seen


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize("statement", ["DISCARD ALL", "deallocate   all", "DEALLOCATE PREPARE ALL"])
def test_a_clients_discard_all_frees_its_names_and_spares_the_others(
    start_router, cluster: Cluster, statement, extended
):
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True, prepare_threshold=0) as conn, \
            psycopg.connect(router.dsn("carol"), autocommit=True, prepare_threshold=0) as other:
        query = "SELECT %s::int * 5"
        assert other.execute(query, (1,)).fetchone() == (5,)  # prepared on the one server
        with psycopg.connect(cluster.primary.dsn("app"), autocommit=True, prepare_threshold=0) as direct:
            expected = _outcome(direct, statement, extended)
        assert _outcome(conn, statement, extended) == expected
        # The other client's statement was dropped from the server with the rest: prepared
        # again, unseen.
        assert other.execute(query, (2,)).fetchone() == (10,)


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


async def test_sql_level_prepare_sent_with_the_extended_protocol_is_refused(router):
    """The same statements in a Parse (asyncpg's fetch, named or unnamed; psycopg's
    prepare=True): refused there too, at their Execute, rather than left on a server
    connection that other clients then use."""
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        for sql in ("PREPARE q AS SELECT 1", "EXECUTE q", "DEALLOCATE q"):
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="not supported in transaction pool mode"):
                conn.execute(sql, prepare=True)
        assert conn.execute("SELECT %s::int", (1,), prepare=True).fetchone() == (1,)
    for cache in (100, 0):  # a named statement from asyncpg's cache, or the unnamed one
        conn = await asyncpg.connect(router.dsn("carol"), statement_cache_size=cache)
        try:
            for sql in ("PREPARE q(int) AS SELECT $1", "  execute q(1)", "DEALLOCATE PREPARE q"):
                with pytest.raises(asyncpg.FeatureNotSupportedError) as exc:
                    await conn.fetch(sql)
                assert exc.value.hint.startswith("Use your driver's prepared statements")
            assert await conn.fetchval("SELECT 2") == 2
            await conn.execute("BEGIN")
            with pytest.raises(asyncpg.FeatureNotSupportedError):
                await conn.fetch("PREPARE q AS SELECT 1")
            with pytest.raises(asyncpg.InFailedSQLTransactionError):  # failed like any error
                await conn.fetch("SELECT 1")
            await conn.execute("ROLLBACK")
        finally:
            await conn.close()


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


@pytest.mark.parametrize("failing", ["BEGIN; DISCARD ALL", "SELECT 1; DISCARD ALL"], ids=["transaction", "implicit"])
def test_a_discard_all_that_fails_drops_nothing(start_router, cluster: Cluster, failing):
    """DISCARD ALL cannot run inside a transaction block (a multi-statement Query is one): it
    fails, and every statement stays, the client's names and the server's alike."""
    router = start_router(pool_size=1)

    def outcome(conn: psycopg.Connection) -> list:
        query = "SELECT %s::int * 3"
        seen = [conn.execute(query, (1,)).fetchone()]
        try:
            conn.execute(failing, prepare=False)
        except psycopg.Error as exc:
            seen.append(exc.sqlstate)
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        seen += [conn.execute(query, (i,)).fetchone() for i in (2, 3)]
        return seen

    with psycopg.connect(cluster.primary.dsn("app"), autocommit=True, prepare_threshold=0) as direct:
        expected = outcome(direct)
    with psycopg.connect(router.dsn("carol"), autocommit=True, prepare_threshold=0) as conn:
        assert outcome(conn) == expected
        # A statement another client prepares afterwards on the same server connection.
        with psycopg.connect(router.dsn("carol"), autocommit=True, prepare_threshold=0) as other:
            assert other.execute("SELECT %s::int * 3", (5,)).fetchone() == (15,)
