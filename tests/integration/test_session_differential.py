"""Transaction pooling keeps a client's session settings as a dedicated connection would:
the same statements, run through the router and straight on PostgreSQL, give the same
results and leave the same settings (and listening channels, role), while another client
keeps using the pooled server connections between the client's transactions, so the router
must replay exactly what PostgreSQL kept. With and without read/write splitting, and in session
mode. Settings are compared as the session has them (SHOW) and as the driver was told them
(ParameterStatus), for clients with and without startup settings (what RESET goes back to).

Sequences come from hypothesis, derandomized: the same cases on every run, plus the cases it
once found, as explicit examples.
"""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.cluster import Cluster
from tests.integration.test_splitting import wait_replicas_eligible

STEPS = [
    "SET search_path = sp_a",
    "SET search_path = sp_b",
    "RESET search_path",
    "RESET ALL",
    "SET LOCAL search_path = sp_local",
    "SELECT set_config('search_path', 'sp_c', false)",
    "SELECT set_config('search_path', 'sp_tx', true)",
    "SET work_mem = '5MB'",
    "RESET work_mem",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT s1",
    "SAVEPOINT s2",
    "RELEASE s1",
    "ROLLBACK TO s1",
    "ROLLBACK TO SAVEPOINT s2",
    "SELECT 1/0",
    "SET search_path = sp_d; SELECT 1/0",
    "BEGIN; SET search_path = sp_e; COMMIT",
    "SET work_mem = '6MB'; SAVEPOINT s1",
    "SAVEPOINT s2; SET search_path = sp_f; ROLLBACK TO s2",
    "DISCARD ALL",
    "SET TIME ZONE 'Asia/Tokyo'",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET default_transaction_read_only = off",
    "RESET default_transaction_read_only",
    "DO $$BEGIN SET search_path = sp_do; END$$",
    "SELECT set_config('work_mem', '9MB', false) WHERE false",
    "SELECT set_config('work_mem', '8MB', false) FROM generate_series(1, 2)",
    "CREATE TEMP TABLE IF NOT EXISTS tmp_diff (a int)",
    "SELECT count(*) FROM tmp_diff",
    "SET work_mem = '5MB'; RESET ALL; SELECT 1",
    "SET search_path = sp_g; DISCARD ALL",
    "LISTEN ch_a",
    "UNLISTEN ch_a",
    "UNLISTEN *",
    "RESET ALL; SELECT 1/0",
    "COMMIT AND CHAIN; SET search_path = sp_ch; ROLLBACK",
    "ROLLBACK AND CHAIN; SET work_mem = '6MB'; COMMIT AND CHAIN",
    "SET TIME ZONE 'Europe/Paris'; RESET TIME ZONE",
    "SET ROLE pg_monitor",
    "RESET ROLE",
    "SELECT set_config('role', 'pg_read_all_settings', false)",
    "DECLARE c_diff CURSOR WITH HOLD FOR SELECT generate_series(1, 3)",
    "FETCH c_diff",
    "CLOSE c_diff",
    "START TRANSACTION READ ONLY",
    "BEGIN ISOLATION LEVEL SERIALIZABLE",
    "SET TRANSACTION READ ONLY",
    "BEGIN READ WRITE",
    "SET TRANSACTION READ WRITE",
    "COMMIT AND CHAIN",
    "ROLLBACK AND CHAIN",
    "END",
    "ABORT",
    # Other spellings, and settings the server reports to the client (ParameterStatus).
    "SET SCHEMA 'sp_schema'",
    "SET search_path TO DEFAULT",
    "SET SESSION search_path = \"sp;quoted\", 'sp q'",
    "SET application_name = 'app;x'",
    "SET application_name = $$dollar's$$",
    "RESET application_name",
    "SET DateStyle = 'SQL, DMY'",
    "SET IntervalStyle = iso_8601",
    "SET TIME ZONE LOCAL",
    "SET TIME ZONE INTERVAL '+05:30' HOUR TO MINUTE",
    "RESET TIME ZONE",
    "SET NAMES 'LATIN1'",
    "RESET client_encoding",
    "SET statement_timeout = '10s'",
    "SET default_transaction_isolation = 'repeatable read'",
    "SET LOCAL work_mem = '2MB'",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "/* a comment */ SET work_mem = '4MB'",
    "SELECT 1; SET search_path = sp_h",
]


def _run(conn: psycopg.Connection, sql: str, prepare: bool | None = None) -> str:
    """What a statement did, comparable across connections: its status, or its SQLSTATE.
    ``prepare``: psycopg's, True for a named statement (Parse, then Bind/Execute), False for a
    simple Query, None for psycopg's default (a named one from the sixth time a text runs)."""
    try:
        cur = conn.execute(sql, prepare=prepare)
    except psycopg.Error as exc:
        return f"error {exc.sqlstate}"
    return cur.statusmessage or ""


REPORTED = ("application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone",
            "default_transaction_read_only", "is_superuser", "session_authorization",
            "standard_conforming_strings")


SHOWN = ("search_path", "work_mem", "TimeZone", "default_transaction_read_only", "role", "application_name",
         "DateStyle", "IntervalStyle", "client_encoding", "statement_timeout", "default_transaction_isolation",
         "transaction_isolation")
# One query for them all (SHOW's values): a round trip per setting made this suite's longest test.
SHOW_ALL = "SELECT " + ", ".join(f"current_setting('{name}')" for name in SHOWN)


def _show(conn: psycopg.Connection) -> list[str]:
    # What the server reported (ParameterStatus), as the client's driver keeps it.
    out = [f"{name}={conn.info.parameter_status(name)}" for name in REPORTED]
    try:
        out.extend(conn.execute(SHOW_ALL).fetchone())
    except psycopg.Error as exc:
        out.extend([f"error {exc.sqlstate}"] * len(SHOWN))
    try:
        out.append(conn.execute("SELECT array_agg(c ORDER BY c) FROM pg_listening_channels() c").fetchone()[0])
    except psycopg.Error as exc:
        out.append(f"error {exc.sqlstate}")
    return out


def _same_settings(client: psycopg.Connection, direct: psycopg.Connection, steps: list[str], when: str) -> None:
    mine, theirs = _show(client), _show(direct)
    assert mine == theirs, f"{' | '.join(steps)}: {when}: {[(a, b) for a, b in zip(mine, theirs, strict=True) if a != b]}"


@pytest.fixture(params=["primary", "split", "session"])
def pooled(start_router, request):
    """A router with two server connections per node, shared by the client under test and
    another: the other takes the one the client used last (the most recently released),
    unless the client is pinned to it. With splitting, the client's reads run on replicas
    and its other transactions on the primary, each on a connection last used by anyone.
    In session mode each client keeps one, reset (DISCARD ALL) when it leaves."""
    split = request.param == "split"
    mode = "session" if request.param == "session" else "transaction"
    router = start_router(pool_size=2, query_wait_timeout=5, split=split, pool_mode=mode)
    if split:
        wait_replicas_eligible(router)
    return router


# Settings from the startup packet: what RESET, RESET ALL and DISCARD ALL go back to.
STARTUP = "-c TimeZone=Asia/Tokyo -c search_path=sp_start -c DateStyle=SQL,DMY -c IntervalStyle=iso_8601"
# With a role too: RESET ROLE and DISCARD ALL go back to it, RESET ALL leaves it alone.
STARTUP_ROLE = STARTUP + " -c role=pg_monitor"

# Inside a transaction: what savepoints and errors do to the SETs before and after them.
IN_TRANSACTION = [
    "SET search_path = sp_a",
    "SET search_path = sp_b",
    "SET work_mem = '5MB'",
    "RESET search_path",
    "SAVEPOINT s1",
    "SAVEPOINT s2",
    "RELEASE s1",
    "RELEASE SAVEPOINT s2",
    "ROLLBACK TO s1",
    "ROLLBACK TO SAVEPOINT s2",
    "SELECT 1/0",
    "SELECT set_config('search_path', 'sp_c', false)",
    "LISTEN ch_b",
    "UNLISTEN *",
    "SET ROLE pg_monitor",
    "RESET ROLE",
    "COMMIT AND CHAIN",
    "ROLLBACK AND CHAIN",
    "SET LOCAL work_mem = '3MB'",
    "SET application_name = 'in_tx'",
    "SET TIME ZONE 'Europe/Paris'",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "RESET ALL",
    "RESET TIME ZONE",
    "SET search_path TO DEFAULT",
]
_transactions = st.tuples(
    st.just("BEGIN"),
    st.lists(st.sampled_from(IN_TRANSACTION), min_size=1, max_size=6),
    st.sampled_from(["COMMIT", "ROLLBACK"]),
).map(lambda t: [t[0], *t[1], t[2]])
_sequences = st.lists(
    st.one_of(st.sampled_from(STEPS).map(lambda step: [step]), _transactions), min_size=1, max_size=5
).map(lambda units: [step for unit in units for step in unit])


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_sequences, prepare=st.sampled_from([None, False, True]), options=st.sampled_from(["", STARTUP, STARTUP_ROLE]))
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "SAVEPOINT s1", "SET search_path = sp_b",
                "ROLLBACK TO s1", "COMMIT"])
@example(options="", prepare=None, steps=["SET search_path = sp_a", "SET search_path = sp_a", "DISCARD ALL", "DISCARD ALL"])
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "SAVEPOINT s2", "RELEASE s1", "ROLLBACK TO SAVEPOINT s2", "COMMIT"])
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "SAVEPOINT s2", "ROLLBACK TO s1", "ROLLBACK TO SAVEPOINT s2", "COMMIT"])
@example(options="", prepare=None, steps=["DO $$BEGIN SET search_path = sp_do; END$$", "SET search_path = sp_g; DISCARD ALL"])
@example(options="", prepare=True, steps=["SET TIME ZONE 'Asia/Tokyo'", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"])
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "ROLLBACK AND CHAIN", "COMMIT"])
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "SELECT 1/0", "COMMIT AND CHAIN", "SET work_mem = '5MB'",
                              "COMMIT"])
@example(options="", prepare=True, steps=["BEGIN", "SET search_path = sp_a", "ROLLBACK AND CHAIN", "COMMIT"])
@example(options=STARTUP, prepare=None, steps=["SET search_path = sp_a", "DISCARD ALL", "RESET TIME ZONE"])
@example(options=STARTUP, prepare=True, steps=["SET TIME ZONE LOCAL", "SET search_path TO DEFAULT"])
@example(options=STARTUP, prepare=None, steps=["BEGIN", "SET TIME ZONE 'Europe/Paris'", "RESET ALL", "ROLLBACK"])
@example(options="", prepare=False, steps=["SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "BEGIN READ WRITE",
                                        "SET TRANSACTION READ WRITE", "COMMIT"])
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "ROLLBACK AND CHAIN",
                                       "SET application_name = 'in_tx'", "COMMIT AND CHAIN", "COMMIT"])
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "COMMIT AND CHAIN; SET search_path = sp_ch; ROLLBACK"])
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "ROLLBACK AND CHAIN; SET work_mem = '6MB'; COMMIT AND CHAIN",
                                       "COMMIT"])
@example(options="", prepare=None, steps=["ROLLBACK AND CHAIN; SET work_mem = '6MB'; COMMIT AND CHAIN"])
@example(options="", prepare=None, steps=["BEGIN", "SELECT 1/0; COMMIT AND CHAIN; SET work_mem = '6MB'", "ROLLBACK"])
# A ROLLBACK TO's tag is ROLLBACK too: the transaction goes on, and its COMMIT AND CHAIN commits.
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "SAVEPOINT s1", "ROLLBACK TO s1",
                                       "COMMIT AND CHAIN", "COMMIT"])
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "SAVEPOINT s1", "SELECT 1/0",
                                       "ROLLBACK TO s1", "COMMIT AND CHAIN", "COMMIT"])
@example(options="", prepare=True, steps=["BEGIN", "SET search_path = sp_a", "SAVEPOINT s1", "ROLLBACK TO s1",
                                       "SET work_mem = '5MB'", "COMMIT AND CHAIN", "ROLLBACK"])
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a", "ROLLBACK TO s1", "SET search_path = sp_a",
                                       "COMMIT"])  # no such savepoint: no tag, the COMMIT's ROLLBACK is a real one
@example(options="", prepare=None, steps=["BEGIN", "SET search_path = sp_a; SAVEPOINT s1; ROLLBACK TO s1; COMMIT AND CHAIN",
                                       "COMMIT"])
def test_the_router_keeps_settings_as_postgresql_does(
    pooled, cluster: Cluster, steps: list[str], prepare: bool | None, options: str
) -> None:
    # A client without an application_name would see the router's server connections' own
    # (`server_application_name`), where PostgreSQL has none: both name one.
    direct = psycopg.connect(cluster.primary.dsn("app"), autocommit=True, application_name="diff", options=options)
    client = psycopg.connect(pooled.dsn("carol"), autocommit=True, application_name="diff", options=options)
    other = psycopg.connect(pooled.dsn("carol"), autocommit=True)
    try:
        for i, step in enumerate(steps):
            assert _run(client, step, prepare) == _run(direct, step, prepare), (steps[: i + 1], "the result")
            _same_settings(client, direct, steps[: i + 1], "the settings after it")
            if client.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                # Between the client's transactions the server connection is anyone's: the
                # other client leaves its own settings on it, and the client's next
                # transaction must find its own again.
                other.execute("SET search_path = sp_other; SET work_mem = '7MB'; SET TIME ZONE 'UTC'; "
                              "SET default_transaction_read_only = on; SET application_name = 'other'; "
                              "SET DateStyle = 'German'; SET IntervalStyle = 'postgres_verbose'; "
                              "SET statement_timeout = '20s'; SET default_transaction_isolation = 'serializable'")
                _same_settings(client, direct, steps[: i + 1], "the settings on a server used since")
    finally:
        for conn in (direct, client, other):
            conn.close()


# Pipelined (psycopg's pipeline mode: a Sync after each statement, replies read later): where
# the router's restore after a RESET goes among many Syncs. (DISCARD ALL cannot run there.)
PIPELINED = ["SET search_path = sp_a", "RESET ALL", "RESET TimeZone", "SET TIME ZONE 'Europe/Paris'",
             "SET application_name = 'x'", "RESET application_name", "SET TIME ZONE LOCAL", "SELECT 1",
             "SET DateStyle = 'German'", "RESET DateStyle"]


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(PIPELINED), min_size=1, max_size=6),
       prepare=st.sampled_from([None, False, True]))
def test_settings_set_in_a_pipeline_are_postgresql_s(
    pooled, cluster: Cluster, steps: list[str], prepare: bool | None
) -> None:
    direct = psycopg.connect(cluster.primary.dsn("app"), autocommit=True, application_name="diff", options=STARTUP)
    client = psycopg.connect(pooled.dsn("carol"), autocommit=True, application_name="diff", options=STARTUP)
    other = psycopg.connect(pooled.dsn("carol"), autocommit=True)
    try:
        for conn in (client, direct):
            with conn.pipeline():
                for step in steps:
                    conn.execute(step, prepare=prepare)
        _same_settings(client, direct, steps, "the settings after the pipeline")
        other.execute("SET TIME ZONE 'UTC'; SET DateStyle = 'Postgres'; SET search_path = sp_other")
        _same_settings(client, direct, steps, "the settings on a server used since")
    finally:
        for conn in (direct, client, other):
            conn.close()
