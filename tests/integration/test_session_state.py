"""Session state under transaction pooling: a client's plain SETs and startup parameters
follow it to every server connection it uses, and never leak to another client."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest


def backend_pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


@pytest.mark.parametrize(
    "setting, statement, value",
    [
        ("search_path", "SET search_path = pg_catalog", "pg_catalog"),
        ("TimeZone", "SET TimeZone TO 'Asia/Tokyo'", "Asia/Tokyo"),
        ("DateStyle", "SET datestyle = 'SQL, DMY'", "SQL, DMY"),
        ("IntervalStyle", "SET intervalstyle = postgres_verbose", "postgres_verbose"),
        ("statement_timeout", "SET statement_timeout = '12s'", "12s"),
        ("lock_timeout", "SET lock_timeout = 3000", "3s"),
        ("idle_in_transaction_session_timeout", "SET idle_in_transaction_session_timeout = '1min'", "1min"),
        ("application_name", "SET application_name = 'mine'", "mine"),
        ("extra_float_digits", "SET extra_float_digits = 2", "2"),
        ("default_transaction_isolation", "SET default_transaction_isolation = 'repeatable read'", "repeatable read"),
        ("default_transaction_read_only", "SET default_transaction_read_only = on", "on"),
    ],
)
def test_a_set_follows_its_client_and_not_the_server(start_router, setting, statement, value):
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a, psycopg.connect(
        router.dsn("carol"), autocommit=True
    ) as b:
        default = b.execute(f"SHOW {setting}").fetchone()[0]
        assert default != value
        a.execute(statement)
        assert a.execute(f"SHOW {setting}").fetchone()[0] == value
        # b runs on the very same server connection (pool of one) and sees clean state ...
        assert backend_pid(b) == backend_pid(a)
        assert b.execute(f"SHOW {setting}").fetchone()[0] == default
        # ... and a still sees its own, in a transaction too.
        assert a.execute(f"SHOW {setting}").fetchone()[0] == value
        with a.transaction():
            assert a.execute(f"SHOW {setting}").fetchone()[0] == value
        a.execute(f"RESET {setting}")
        assert a.execute(f"SHOW {setting}").fetchone()[0] == default


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT 1; SET search_path = pg_catalog",  # after another statement
        "/* app: x */ SET search_path = pg_catalog",  # after a comment
        "-- app: x\nSET search_path = pg_catalog",
        "BEGIN; SET search_path = pg_catalog; COMMIT",
    ],
)
def test_a_set_that_does_not_start_the_query_is_seen_too(start_router, statement):
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a, psycopg.connect(
        router.dsn("carol"), autocommit=True
    ) as b:
        a.execute(statement, prepare=False)
        assert backend_pid(b) == backend_pid(a)
        assert b.execute("SHOW search_path").fetchone() == ('"$user", public',)  # no leak
        assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)  # and a keeps it


def test_a_set_sent_with_the_extended_protocol_is_seen(start_router):
    """JDBC sends every statement with Parse/Bind/Execute; so do psycopg's prepared statements
    and asyncpg's fetch(). Such a SET must follow its client and stay away from others."""
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a, psycopg.connect(
        router.dsn("carol"), autocommit=True
    ) as b:
        a.execute("SET search_path = pg_catalog", prepare=True)
        assert backend_pid(b) == backend_pid(a)
        assert b.execute("SHOW search_path").fetchone() == ('"$user", public',)
        assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)

    async def with_asyncpg() -> tuple[str, str]:
        a = await asyncpg.connect(router.dsn("carol"))
        b = await asyncpg.connect(router.dsn("carol"))
        try:
            await a.fetch("/* app */ SET TimeZone = 'Asia/Tokyo'")
            return await b.fetchval("SHOW TimeZone"), await a.fetchval("SHOW TimeZone")
        finally:
            await a.close()
            await b.close()

    other, own = asyncio.run(with_asyncpg())
    assert other != "Asia/Tokyo" and own == "Asia/Tokyo"


def test_settings_follow_a_client_to_another_server_connection(start_router):
    router = start_router(pool_size=2)
    a = psycopg.connect(router.dsn("carol"), autocommit=True)
    holder = psycopg.connect(router.dsn("carol"), autocommit=True)
    a.execute("SET search_path = pg_catalog")
    first = backend_pid(a)
    # Hold a's last server connection so its next transaction lands on the other one.
    holder.execute("BEGIN")
    held = backend_pid(holder)
    if held != first:  # the pool may hand holder the other server; then a keeps its own
        holder.execute("COMMIT")
        holder.execute("BEGIN")
        assert backend_pid(holder) == first
    assert backend_pid(a) != first
    assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)
    holder.execute("COMMIT")
    a.close()
    holder.close()


def test_startup_parameters_hold_on_every_server_connection(start_router):
    router = start_router(pool_size=1)
    dsn = router.dsn("carol", application_name="startup-app", options="-c%20search_path%3Dpg_catalog")
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(router.dsn("carol"), autocommit=True) as b:
        assert a.execute("SELECT current_setting('application_name'), current_setting('search_path')").fetchone() == (
            "startup-app",
            "pg_catalog",
        )
        assert b.execute("SHOW search_path").fetchone() == ('"$user", public',)
        assert b.execute("SHOW application_name").fetchone() != ("startup-app",)
        assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)
        a.execute("SET search_path = public")
        a.execute("RESET search_path")  # back to the startup value, as on a dedicated server
        assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)
        a.execute("RESET ALL")
        assert a.execute("SHOW application_name").fetchone() == ("startup-app",)


def test_set_local_is_not_carried_over(start_router):
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a:
        with a.transaction():
            a.execute("SET LOCAL search_path = pg_catalog")
            assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)
        assert a.execute("SHOW search_path").fetchone() == ('"$user", public',)


def test_failed_set_does_not_break_the_client(start_router):
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a, psycopg.connect(
        router.dsn("carol"), autocommit=True
    ) as b:
        a.execute("SET search_path = pg_catalog")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            a.execute("SET TimeZone = 'Not/AZone'")
        assert b.execute("SELECT 1").fetchone() == (1,)  # the server went to b meanwhile
        assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)


def _search_path_everywhere(router_dsn: str, run) -> set[str]:
    """Run ``run(a)`` on client a, then read a's search_path on each server connection of a
    pool of two: two holders keep both busy and free one at a time, so a runs on that one."""
    a = psycopg.connect(router_dsn, autocommit=True)
    holders = [psycopg.connect(router_dsn, autocommit=True) for _ in range(2)]
    try:
        run(a)
        seen, pids = set(), set()
        for holder in holders:
            holder.execute("BEGIN")
            backend_pid(holder)
        for holder in holders:
            holder.execute("COMMIT")  # one server connection idle: a's next queries run there
            pids.add(backend_pid(a))
            seen.add(a.execute("SHOW search_path").fetchone()[0])
            holder.execute("BEGIN")
            backend_pid(holder)
        assert len(pids) == 2
        return seen
    finally:
        for conn in (a, *holders):
            conn.close()


def test_a_set_that_never_reached_a_server_is_forgotten(start_router):
    """A SET held while its client waits for a server connection, then failed with 53300 when
    the wait timed out, never ran: no server connection gets it for that client later."""
    router = start_router(pool_size=2, query_wait_timeout=1)

    def wait_in_vain(a) -> None:
        busy = [psycopg.connect(router.dsn("carol")) for _ in range(2)]
        for conn in busy:
            conn.execute("SELECT 1")  # a transaction holds each server connection
        with pytest.raises(psycopg.errors.TooManyConnections):
            a.execute("SET search_path = never_ran")
        for conn in busy:
            conn.rollback()
            conn.close()

    assert _search_path_everywhere(router.dsn("carol"), wait_in_vain) == {'"$user", public'}


def _explicit_rollback(a) -> None:
    a.execute("BEGIN")
    a.execute("SET search_path = pg_catalog")
    a.execute("ROLLBACK")


def _error_then_rollback(a) -> None:
    a.execute("BEGIN")
    a.execute("SET search_path = pg_catalog")
    with pytest.raises(psycopg.errors.DivisionByZero):
        a.execute("SELECT 1/0")
    a.execute("COMMIT")  # of a failed transaction: rolls back


def _failed_implicit_transaction(a) -> None:
    # One Query without BEGIN is one implicit transaction: the error undoes the SET.
    with pytest.raises(psycopg.errors.DivisionByZero):
        a.execute("SET search_path = pg_catalog; SELECT 1/0", prepare=False)


def _set_config_rolled_back(a) -> None:
    a.execute("BEGIN")
    a.execute("SELECT set_config('search_path', 'pg_catalog', false)")
    a.execute("ROLLBACK")


def _failed_extended(a) -> None:
    a.execute("BEGIN")
    a.execute("SET search_path = pg_catalog", prepare=True)
    with pytest.raises(psycopg.errors.DivisionByZero):
        a.execute("SELECT %s / 0", (1,))
    a.execute("ROLLBACK")


@pytest.mark.parametrize(
    "run",
    [
        _explicit_rollback,
        lambda a: a.execute("BEGIN; SET search_path = pg_catalog; ROLLBACK", prepare=False),
        _error_then_rollback,
        _failed_implicit_transaction,
        _failed_extended,
        _set_config_rolled_back,
    ],
    ids=["rollback", "rollback-one-query", "error-then-commit", "implicit-transaction", "extended", "set_config"],
)
def test_a_set_undone_by_rollback_is_forgotten(start_router, run):
    """PostgreSQL undoes a SET whose transaction rolls back; the router must forget it too, or
    the client sees its default on the server connection that ran it and the SET's value on
    every other one."""
    router = start_router(pool_size=2)
    assert _search_path_everywhere(router.dsn("carol"), run) == {'"$user", public'}


def _committed_then_error(a) -> None:
    with pytest.raises(psycopg.errors.DivisionByZero):
        a.execute("BEGIN; SET search_path = pg_catalog; COMMIT; SELECT 1/0", prepare=False)


def _savepoint_recovered(a) -> None:
    a.execute("BEGIN")
    a.execute("SET search_path = pg_catalog")
    a.execute("SAVEPOINT s")
    with pytest.raises(psycopg.errors.DivisionByZero):
        a.execute("SELECT 1/0")
    a.execute("ROLLBACK TO SAVEPOINT s")
    a.execute("COMMIT")


@pytest.mark.parametrize("run", [_committed_then_error, _savepoint_recovered], ids=["committed-then-error", "savepoint"])
def test_a_set_whose_transaction_commits_is_kept(start_router, run):
    router = start_router(pool_size=2)
    assert _search_path_everywhere(router.dsn("carol"), run) == {"pg_catalog"}


def _savepoint_script(statements: list[str], prepare: bool = False):
    def run(a) -> None:
        for statement in statements:
            a.execute(statement, prepare=prepare)

    return run


_DEFAULT_PATH = '"$user", public'
_SAVEPOINTS = [
    "BEGIN",
    "SET search_path = pg_catalog",
    "SAVEPOINT s",
    "SET search_path = information_schema",
    "ROLLBACK TO SAVEPOINT s",
    "COMMIT",
]


@pytest.mark.parametrize(
    "run, expected",
    [
        (_savepoint_script(_SAVEPOINTS), "pg_catalog"),
        (_savepoint_script(["; ".join(_SAVEPOINTS)]), "pg_catalog"),
        (_savepoint_script(_SAVEPOINTS, prepare=True), "pg_catalog"),
        (
            _savepoint_script(
                ["BEGIN", "SAVEPOINT s", "SET search_path = pg_catalog", "ROLLBACK TO s", "COMMIT"]
            ),
            _DEFAULT_PATH,
        ),
        (
            _savepoint_script(
                [
                    "BEGIN",
                    "SAVEPOINT outer_sp",
                    "SET search_path = pg_catalog",
                    "SAVEPOINT inner_sp",
                    "SET search_path = information_schema",
                    "RELEASE inner_sp",
                    "ROLLBACK WORK TO outer_sp",
                    "COMMIT",
                ]
            ),
            _DEFAULT_PATH,
        ),
        (
            _savepoint_script(
                ["BEGIN", "SET search_path = pg_catalog", "SAVEPOINT s",
                 "SET search_path = information_schema", "RELEASE SAVEPOINT s", "COMMIT"]
            ),
            "information_schema",
        ),
        (
            _savepoint_script(
                ["BEGIN", "SET search_path = pg_catalog", "SAVEPOINT s", "SET search_path = information_schema",
                 "SAVEPOINT s", "SET search_path = public", "ROLLBACK TO s", "COMMIT"]
            ),
            "information_schema",
        ),
    ],
    ids=["queries", "one-query", "extended", "savepoint-before-any-set", "released-then-outer", "released",
         "same-name-twice"],
)
def test_a_set_undone_by_rollback_to_savepoint_is_forgotten(start_router, run, expected):
    """ROLLBACK TO SAVEPOINT undoes the SETs made since the savepoint, RELEASE keeps them, and
    the transaction's COMMIT keeps what is left: as PostgreSQL does, on every server
    connection the client runs on afterwards."""
    router = start_router(pool_size=2)
    assert _search_path_everywhere(router.dsn("carol"), run) == {expected}


def test_statements_before_a_set_in_one_query_do_not_see_it(start_router):
    """The settings a server connection gets before a client's transaction are the client's
    settings before that transaction: a SET later in the same Query takes effect where the
    client put it, not ahead of the statements before it."""
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a, psycopg.connect(
        router.dsn("carol"), autocommit=True
    ) as b:
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        b.execute("SELECT 1")  # the server connection now carries b's settings: a's are replayed
        cur = a.execute(
            "SELECT current_setting('TimeZone'), current_setting('search_path');"
            " SET search_path = pg_catalog",
            prepare=False,
        )
        assert cur.fetchone() == ("Asia/Tokyo", '"$user", public')
        assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)


def _prepared_set_run_again(a) -> None:
    # prepare=True: psycopg parses each text once, then runs it again with a Bind alone (as it
    # does by itself after prepare_threshold runs), so the router sees the third SET's text
    # only in the first one's Parse.
    for value in ("pg_catalog", "public", "pg_catalog"):
        a.execute(f"SET search_path = {value}", prepare=True)


def _prepared_set_config_run_again(a) -> None:
    for value in ("pg_catalog", "public", "pg_catalog"):
        a.execute(f"SELECT set_config('search_path', '{value}', false)", prepare=True)


def _prepared_reset_all_run_again(a) -> None:
    for _ in range(2):
        a.execute("SET search_path = pg_catalog")
        a.execute("RESET ALL", prepare=True)


@pytest.mark.parametrize(
    "run, expected",
    [
        (_prepared_set_run_again, "pg_catalog"),
        (_prepared_set_config_run_again, "pg_catalog"),
        (_prepared_reset_all_run_again, '"$user", public'),
    ],
    ids=["set", "set_config", "reset-all"],
)
def test_a_prepared_statement_run_again_changes_settings_again(start_router, run, expected):
    router = start_router(pool_size=2)
    assert _search_path_everywhere(router.dsn("carol"), run) == {expected}


def pinned(router) -> int:
    return router.call(lambda r: len(r.pinned_clients))


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT set_config('search_path', 'pg_catalog', false)",
        "SELECT 1, pg_catalog.set_config('search_path', 'pg_catalog', 'off')",
        "select SET_CONFIG('search_path', 'pg_catalog', false)",
        "select Set_Config('search_path', 'pg_catalog', false)",
        "SELECT U&\"set\\005fconfig\"('search_path', 'pg_catalog', false)",  # a Unicode escape in the name
    ],
)
@pytest.mark.parametrize("prepare", [False, True], ids=["query", "parse"])
def test_set_config_of_the_session_is_tracked_like_a_set(start_router, statement, prepare):
    """set_config(name, value, false) with constants is a SET by another name: replayed for
    its client, reset for the others."""
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a, psycopg.connect(
        router.dsn("carol"), autocommit=True
    ) as b:
        a.execute(statement, prepare=prepare)
        assert backend_pid(b) == backend_pid(a)
        assert b.execute("SHOW search_path").fetchone() == ('"$user", public',)  # no leak
        assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)  # and a keeps it
        assert pinned(router) == 0


def test_set_config_with_a_parameter_pins_its_client(start_router):
    """The value of set_config('app.tenant', $1, false) is known only to the server that ran
    it: the client keeps that server connection, and no other client gets it."""
    router = start_router(pool_size=2)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a, psycopg.connect(
        router.dsn("carol"), autocommit=True
    ) as b:
        a.execute("SELECT set_config('app.tenant', %s, false)", ("acme",))
        assert pinned(router) == 1
        for _ in range(4):
            assert a.execute("SELECT current_setting('app.tenant', true)").fetchone() == ("acme",)
            assert b.execute("SELECT current_setting('app.tenant', true)").fetchone()[0] in (None, "")
        a.execute("DISCARD ALL")
        assert pinned(router) == 0


@pytest.mark.parametrize(
    "sql, value",
    [
        ("SELECT set_config('app.tenant', 'never', false) WHERE false", ""),
        ("SELECT set_config('app.tenant', 'acme', false) FROM (VALUES (1)) AS v", "acme"),
        ("SELECT CASE WHEN false THEN set_config('app.tenant', 'never', false) END", ""),
    ],
    ids=["where-false", "from", "case"],
)
def test_a_set_config_that_may_not_run_pins_its_client(start_router, sql, value):
    """A set_config() that runs once per row (FROM, WHERE) or maybe not at all (CASE) leaves a
    value the text does not tell: like one with a parameter, it pins its client. It was
    tracked as if it had run once, and the router replayed a setting the client never made."""
    router = start_router(pool_size=2)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a:
        a.execute(sql)
        assert pinned(router) == 1
        for _ in range(4):
            assert a.execute("SELECT coalesce(current_setting('app.tenant', true), '')").fetchone() == (value,)


def test_transaction_scoped_set_config_changes_nothing(start_router):
    """set_config(..., true), PostgREST's way, lasts one transaction: nothing to track or pin."""
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as a:
        with a.transaction():
            a.execute("SELECT set_config('search_path', %s, true)", ("pg_catalog",))
            assert a.execute("SHOW search_path").fetchone() == ("pg_catalog",)
        assert a.execute("SHOW search_path").fetchone() == ('"$user", public',)
        assert pinned(router) == 0
        assert router.call(lambda r: next(iter(r.clients.values())).session.key) is None


def test_a_closed_statement_is_forgotten(start_router):
    """What the router remembers of a client's statements that change settings stays bounded
    by what the client keeps prepared: a Close drops it (psycopg closes the statements it
    evicts past prepared_max)."""
    router = start_router(pool_size=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.prepared_max = 2
        for i in range(8):
            conn.execute(f"SET search_path = s{i}", prepare=True)
        conn.execute("SELECT 1")  # after the evictions' Closes
        remembered = router.call(lambda r: [len(c._effects_by_statement) for c in r.clients.values()])
        assert remembered and max(remembered) <= conn.prepared_max + 1
        assert conn.execute("SHOW search_path").fetchone() == ("s7",)
