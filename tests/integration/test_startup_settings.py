"""A client's startup settings (``options='-c name=value'``, TimeZone, DateStyle, ...) are its
session's, in both pool modes, as on a dedicated connection: the server values the client is
told at login (ParameterStatus) and the values its statements see are those PostgreSQL itself
would give it, and a startup setting PostgreSQL refuses fails the login as PostgreSQL does."""

from __future__ import annotations

import asyncio
import datetime
import subprocess

import asyncpg
import psycopg
import pytest

from tests.clients.conftest import client_env
from tests.cluster import Cluster

STARTUP = "-c TimeZone=Asia/Tokyo -c search_path=sp_start -c DateStyle=SQL,DMY -c IntervalStyle=iso_8601"
REPORTED = ("DateStyle", "IntervalStyle", "TimeZone", "client_encoding", "application_name",
            "standard_conforming_strings", "default_transaction_read_only")
SHOWN = ("TimeZone", "search_path", "DateStyle", "IntervalStyle", "application_name")


def _view(conn: psycopg.Connection) -> dict[str, str]:
    """What the driver was told, and what the session has."""
    told = {f"told {name}": conn.info.parameter_status(name) for name in REPORTED}
    return told | {f"shows {name}": conn.execute(f"SHOW {name}").fetchone()[0] for name in SHOWN}


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_startup_settings_are_the_session_s_from_login_on(start_router, cluster: Cluster, pool_mode):
    router = start_router(pool_size=1, pool_mode=pool_mode)
    with psycopg.connect(cluster.primary.dsn("app"), autocommit=True, application_name="app", options=STARTUP) as d, \
            psycopg.connect(router.dsn("carol"), autocommit=True, application_name="app", options=STARTUP) as c:
        assert _view(c) == _view(d)
        # psycopg reads dates by the DateStyle it was told: told ISO, it cannot read 27/11/2026.
        assert c.execute("SELECT '2026-11-27'::date").fetchone()[0] == datetime.date(2026, 11, 27)
    # The next client on the same server connection has none of them.
    with psycopg.connect(cluster.primary.dsn("app"), autocommit=True) as d, \
            psycopg.connect(router.dsn("carol"), autocommit=True) as c:
        assert [c.execute(f"SHOW {name}").fetchone() for name in SHOWN[:4]] == [
            d.execute(f"SHOW {name}").fetchone() for name in SHOWN[:4]
        ]


@pytest.mark.parametrize(
    "settings",
    [{"TimeZone": "Nowhere/Atlantis"}, {"no_such_setting": "1"}, {"DateStyle": "SQL, DMY", "statement_timeout": "soon"}],
    ids=["invalid value", "unknown name", "invalid number"],
)
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_a_startup_setting_postgresql_refuses_fails_the_login(start_router, cluster: Cluster, settings, pool_mode):
    router = start_router(pool_size=1, pool_mode=pool_mode)

    async def refusal(dsn: str) -> tuple[str, str]:
        with pytest.raises(asyncpg.PostgresError) as refused:
            await asyncpg.connect(dsn, server_settings=settings)
        return refused.value.sqlstate, refused.value.message

    assert asyncio.run(refusal(router.dsn("carol"))) == asyncio.run(refusal(cluster.primary.dsn("app")))
    # The server connection it was tried on serves the next client, with nothing of it left.
    with psycopg.connect(router.dsn("carol"), autocommit=True) as c:
        assert c.execute("SHOW DateStyle").fetchone()[0] == "ISO, MDY"
        assert c.execute("SHOW statement_timeout").fetchone()[0] == "0"


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
@pytest.mark.parametrize("prepare", [False, True], ids=["query", "named statement"])
@pytest.mark.parametrize(
    "reset",
    [["DISCARD ALL"], ["RESET ALL"], ["RESET TimeZone"], ["SET TIME ZONE LOCAL"], ["BEGIN", "RESET ALL"],
     ["BEGIN", "SET TimeZone = 'UTC'", "RESET ALL"]],
    ids=["discard all", "reset all", "reset one", "set to default", "reset all in a transaction", "reset all after a set"],
)
def test_a_reset_goes_back_to_the_startup_settings_at_once(start_router, cluster: Cluster, pool_mode, prepare, reset):
    """RESET puts the server connection back to its own login values; the client's are put
    back right after it, in the same transaction, and reported to the client (ParameterStatus)
    before its ReadyForQuery, as a dedicated server would."""
    router = start_router(pool_size=1, pool_mode=pool_mode)
    with psycopg.connect(cluster.primary.dsn("app"), autocommit=True, application_name="app", options=STARTUP) as d, \
            psycopg.connect(router.dsn("carol"), autocommit=True, application_name="app", options=STARTUP) as c:
        for conn in (c, d):
            conn.execute("SET TimeZone = 'Europe/Paris'")
            conn.execute("SET application_name = 'changed'")
            for statement in reset:
                conn.execute(statement, prepare=prepare)
        # Told before the statement's ReadyForQuery, and seen by the transaction's next statement.
        told = [(name, c.info.parameter_status(name)) for name in REPORTED]
        assert told == [(name, d.info.parameter_status(name)) for name in REPORTED]
        assert c.execute("SELECT now()::text, current_setting('application_name')").fetchone()[0][-3:] == \
            d.execute("SELECT now()::text, current_setting('application_name')").fetchone()[0][-3:]
        assert _view(c) == _view(d)
        for conn in (c, d):
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("COMMIT")
        assert _view(c) == _view(d)


def test_a_reset_in_the_query_of_a_copy_leaves_the_copy_alone(start_router):
    """The restore waits for the COPY's data (sent behind the Query it would break the COPY),
    and follows the client's next statement. psql sends the three statements as one Query."""
    router = start_router(pool_size=1)
    script = (
        "CREATE TABLE IF NOT EXISTS copy_after_reset (a int);\n"
        "SET TimeZone = 'UTC' \\; RESET ALL \\; COPY copy_after_reset FROM STDIN;\n1\n2\n\\.\n"
        "SELECT count(*) FROM copy_after_reset;\nSHOW TimeZone;\nDROP TABLE copy_after_reset;\n"
    )
    proc = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-q", "-f", "-", router.dsn("carol")],
        input=script, capture_output=True, text=True, timeout=60,
        env=client_env(PGOPTIONS="-c TimeZone=Asia/Tokyo"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "Asia/Tokyo"]


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_an_asyncpg_pool_resets_a_connection_to_its_startup_settings(start_router, cluster: Cluster, pool_mode):
    """asyncpg's pool resets a connection it takes back (one Query ending in RESET ALL): the
    connection's next user finds the startup settings, as on PostgreSQL."""
    router = start_router(pool_size=2, pool_mode=pool_mode)
    settings = {"TimeZone": "Asia/Tokyo", "DateStyle": "SQL, DMY", "application_name": "pooled"}

    async def after_reset(dsn: str) -> list:
        async with asyncpg.create_pool(dsn, min_size=1, max_size=1, server_settings=settings) as pool:
            async with pool.acquire() as conn:
                await conn.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET application_name = 'used'")
                await conn.execute("LISTEN ch_pool")
            async with pool.acquire() as conn:
                shown = [await conn.fetchval(f"SHOW {name}") for name in settings]
                told = [conn.get_settings().__getattr__(name) for name in settings]
                listening = await conn.fetchval("SELECT count(*) FROM pg_listening_channels()")
                return shown + told + [listening]

    assert asyncio.run(after_reset(router.dsn("carol"))) == asyncio.run(after_reset(cluster.primary.dsn("app")))


@pytest.mark.parametrize("reset", [None, "RESET ROLE", "RESET ALL", "DISCARD ALL"])
def test_a_startup_role_is_its_client_s_alone(start_router, cluster: Cluster, reset):
    """``options='-c role=r'`` makes the session run as r, and RESET ROLE, RESET ALL and
    DISCARD ALL go back to r, as on PostgreSQL. RESET ALL leaves a role alone, so the
    settings prelude could not take it off a server connection: the client keeps its server
    connection for its whole session (pinned), and no other client ever runs as r."""
    router = start_router(pool_size=2)
    with psycopg.connect(cluster.primary.dsn("app"), autocommit=True, options="-c role=pg_monitor") as d, \
            psycopg.connect(router.dsn("carol"), autocommit=True, options="-c role=pg_monitor") as c:
        for conn in (c, d):
            if reset is not None:
                conn.execute("SET ROLE pg_read_all_settings")
                conn.execute(reset)
        assert c.execute("SELECT current_user").fetchone() == d.execute("SELECT current_user").fetchone()
        assert c.info.parameter_status("is_superuser") == d.info.parameter_status("is_superuser")
        # Others, one after another, on whichever server connection was released last.
        for _ in range(3):
            with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
                assert other.execute("SELECT current_user").fetchone()[0] == "postgres"
        assert c.execute("SELECT current_user").fetchone() == d.execute("SELECT current_user").fetchone()
    # Once it has left, its server connection serves others as the server user.
    for _ in range(3):
        with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
            assert other.execute("SELECT current_user").fetchone()[0] == "postgres"


@pytest.mark.parametrize("reset_query", ["DISCARD ALL", "RESET ALL", ""])
def test_a_startup_role_leaves_with_its_session_mode_client(start_router, cluster: Cluster, reset_query):
    """In session mode the router applies a startup role itself, so it takes it off again when
    the client leaves, whatever ``server_reset_query`` does (RESET ALL leaves a role alone)."""
    router = start_router(pool_size=1, pool_mode="session", server_reset_query=reset_query)
    for _ in range(2):
        with psycopg.connect(router.dsn("carol"), autocommit=True, options="-c role=pg_monitor") as c:
            assert c.execute("SELECT current_user").fetchone() == ("pg_monitor",)
        with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
            assert other.execute("SELECT current_user, session_user").fetchone() == ("postgres", "postgres")
            assert other.info.parameter_status("is_superuser") == "on"
