"""Session state that outlives a transaction pins a transaction-mode client to its server
connection until the state is gone; a client dying while pinned never hands it on."""

from __future__ import annotations

import psycopg
import pytest


def pinned(router) -> int:
    return router.call(lambda r: len(r.pinned_clients))


def test_listen_gets_notifications_between_transactions(start_router, cluster):
    router = start_router(pool_size=2)
    listener = psycopg.connect(router.dsn("carol"), autocommit=True)
    listener.execute("LISTEN pgrouter_news")
    assert pinned(router) == 1
    # Notify from elsewhere (directly on the primary) while the listener is idle.
    with psycopg.connect(cluster.primary.dsn("app"), autocommit=True) as direct:
        direct.execute("NOTIFY pgrouter_news, 'hello'")
    received = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=1)]
    assert received == [("pgrouter_news", "hello")]
    listener.execute("UNLISTEN *")
    assert pinned(router) == 0
    listener.close()


def test_advisory_lock_pins_and_dying_client_releases_it(start_router):
    router = start_router(pool_size=2)
    holder = psycopg.connect(router.dsn("carol"), autocommit=True)
    assert holder.execute("SELECT pg_advisory_lock(4242)").fetchone() == ("",)
    pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert holder.execute("SELECT pg_backend_pid()").fetchone()[0] == pid  # kept
    assert pinned(router) == 1
    other = psycopg.connect(router.dsn("carol"), autocommit=True)
    # (Calling pg_try_advisory_lock pins too, even when it fails: pinning is generous.)
    assert other.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (False,)
    assert pinned(router) == 2
    holder.close()  # dies holding the lock
    router.wait_for(lambda r: len(r.pinned_clients) == 1, what="the dead holder's pin released")
    router.wait_for(lambda r: sum(p.stats()["active"] for p in r.pools.pools.values()) == 1, what="its server back")
    assert other.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)
    other.execute("SELECT pg_advisory_unlock_all()")
    assert pinned(router) == 0
    # The dead holder's server connection was reset before reuse: nothing holds the lock.
    with psycopg.connect(router.dsn("carol"), autocommit=True) as third:
        third.execute("BEGIN")
        assert third.execute("SELECT pg_try_advisory_xact_lock(4242)").fetchone() == (True,)
        third.execute("COMMIT")
    other.close()


def test_unlock_all_unpins(start_router):
    router = start_router(pool_size=2)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(7)")
        assert pinned(router) == 1
        conn.execute("SELECT pg_advisory_unlock_all()")
        assert pinned(router) == 0
        router.wait_for(lambda r: all(p.stats()["active"] == 0 for p in r.pools.pools.values()), what="released")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_advisory_xact_lock(8)",
        # A DO block that only writes: an UPDATE's SET clause is no SET statement.
        "DO $$BEGIN UPDATE no_such_table SET a = 1; EXCEPTION WHEN OTHERS THEN NULL; END$$",
    ],
    ids=["xact-advisory-lock", "do-that-only-writes"],
)
def test_what_ends_with_its_transaction_does_not_pin(router, sql):
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute(sql)
        assert pinned(router) == 0


@pytest.mark.parametrize(
    "setup, check",
    [
        ("CREATE TEMP TABLE pin_t AS SELECT 1 AS x", "SELECT x FROM pin_t"),
        ("BEGIN; DECLARE pin_c CURSOR WITH HOLD FOR SELECT 1 AS x; COMMIT", "FETCH pin_c"),
        ("SET ROLE pgr_trust", "SELECT current_user = 'pgr_trust'"),
        # Not the first statement of the query, or after a comment: seen too.
        ("SELECT 1; CREATE TEMP TABLE pin_t AS SELECT 1 AS x", "SELECT x FROM pin_t"),
        ("/* app */ CREATE TEMP TABLE pin_t AS SELECT 1 AS x", "SELECT x FROM pin_t"),
        ("SELECT 1; SET ROLE pgr_trust", "SELECT current_user = 'pgr_trust'"),
        # Who the session runs as, in the spellings that dodge the SET ROLE pattern: RESET ALL
        # in the settings prelude would not undo them (GUC_NO_RESET_ALL).
        ('SET "Role" = pgr_trust', "SELECT current_user = 'pgr_trust'"),
        ("SET session_authorization = pgr_trust", "SELECT session_user = 'pgr_trust'"),
        ("SELECT set_config('ROLE', 'pgr_trust', false)", "SELECT current_user = 'pgr_trust'"),
        ("SELECT set_config('session_authorization', 'pgr_trust', false)", "SELECT session_user = 'pgr_trust'"),
        # RESET ROLE does not undo SET SESSION AUTHORIZATION.
        ("SET SESSION AUTHORIZATION pgr_trust; RESET ROLE", "SELECT session_user = 'pgr_trust'"),
        # Temporary views, sequences and tables made without CREATE TEMP TABLE.
        ("SELECT 1 AS x INTO TEMP pin_t", "SELECT x FROM pin_t"),
        ("CREATE OR REPLACE TEMP VIEW pin_t AS SELECT 1 AS x", "SELECT x FROM pin_t"),
        ("CREATE TEMPORARY RECURSIVE VIEW pin_t(x) AS SELECT 1", "SELECT x FROM pin_t"),
        ("CREATE TEMP SEQUENCE pin_t", "SELECT nextval('pin_t')"),
        ("CREATE TABLE pg_temp.pin_t AS SELECT 1 AS x", "SELECT x FROM pin_t"),
    ],
    ids=[
        "temp-table", "with-hold-cursor", "set-role", "later-temp-table", "comment-temp-table", "later-set-role",
        "quoted-role", "session-authorization-guc", "set-config-role", "set-config-session-authorization",
        "reset-role-after-session-authorization", "select-into-temp", "or-replace-temp-view",
        "temp-recursive-view", "temp-sequence", "pg-temp-schema",
    ],
)
def test_session_objects_pin_until_discard_all(start_router, setup, check):
    router = start_router(pool_size=1, query_wait_timeout=1)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    conn.execute(setup)
    assert pinned(router) == 1
    assert conn.execute(check).fetchone() in [(1,), (True,)]
    # Another client cannot have that server connection meanwhile ...
    other = psycopg.connect(router.dsn("carol"), autocommit=True)
    with pytest.raises(psycopg.errors.TooManyConnections):
        other.execute("SELECT 1")
    conn.execute("DISCARD ALL")
    assert pinned(router) == 0
    # ... and gets it, clean, once the state is gone.
    assert other.execute("SELECT current_user, to_regclass('pin_t')").fetchone() == ("postgres", None)
    conn.close()
    other.close()




@pytest.mark.parametrize(
    "sql",
    [
        "SET ROLE pgr_trust; SET ROLE NONE",
        'SET "role" = pgr_trust; RESET "role"',
        "SET ROLE pgr_trust; RESET SESSION AUTHORIZATION",
        "SET session_authorization = pgr_trust; SET SESSION AUTHORIZATION DEFAULT",
    ],
    ids=["role-none", "reset-quoted-role", "reset-session-authorization", "session-authorization-default"],
)
def test_identity_back_to_the_login_unpins(start_router, sql):
    router = start_router(pool_size=1, query_wait_timeout=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute(sql)
        assert conn.execute("SELECT current_user, session_user").fetchone() == ("postgres", "postgres")
        assert pinned(router) == 0
        with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
            assert other.execute("SELECT current_user").fetchone() == ("postgres",)


_SEARCH_PATH = ("SHOW search_path", "pin_do", '"$user", public')
_USER = ("SELECT current_user", "pgr_trust", "postgres")


@pytest.mark.parametrize(
    "sql, prepare, check",
    [
        # An identity change sent as a Parse.
        ('SET "role" = pgr_trust', True, _USER),
        ("SELECT set_config('role', 'pgr_trust', false)", True, _USER),
        # A DO block that may change settings: what it set only its server connection knows.
        ("DO $$BEGIN PERFORM set_config('search_path', 'pin_do', false); END$$", False, _SEARCH_PATH),
        ("DO $$BEGIN SET search_path = pin_do; END$$", False, _SEARCH_PATH),
        ("SELECT 1; DO $$BEGIN EXECUTE 'SET search_path = pin_do'; END$$", False, _SEARCH_PATH),
    ],
    ids=["parse-set-role", "parse-set-config-role", "do-set-config", "do-set", "later-do-execute"],
)
def test_pinned_until_its_client_leaves(start_router, sql, prepare, check):
    probe, own, clean = check
    router = start_router(pool_size=1, query_wait_timeout=1)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    conn.execute(sql, prepare=prepare)
    assert pinned(router) == 1
    assert conn.execute(probe).fetchone() == (own,)
    conn.close()
    router.wait_for(lambda r: len(r.pinned_clients) == 0, what="the pin gone with its client")
    with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
        assert other.execute(probe).fetchone() == (clean,)


@pytest.mark.parametrize(
    "pin, unpin, prepare",
    [
        # Not the first statement of the query: seen too.
        ("SELECT 1; LISTEN pgrouter_later", "UNLISTEN *", False),
        # In any case, as a Query or a Parse.
        ("SELECT Pg_Advisory_Lock(4343)", "SELECT pg_advisory_unlock_all()", False),
        ("SELECT Pg_Advisory_Lock(4343)", "SELECT pg_advisory_unlock_all()", True),
        ("LISTEN pin_again", "UNLISTEN *", True),
        # Spelt with Unicode escapes, which only the parser reads as the function's name.
        ('SELECT U&"pg_advisory\\005flock"(4343)', 'SELECT U&"pg_advisory\\005funlock_all"()', False),
        ("SELECT U&\"pg_try_advisory!005flock\" UESCAPE '!' (4343)", "SELECT pg_advisory_unlock_all()", True),
    ],
    ids=["later-listen", "advisory-lock-query", "advisory-lock-parse", "listen-parse", "u&-query", "u&-uescape-parse"],
)
def test_pinned_then_unpinned(start_router, pin, unpin, prepare):
    """Each round pins and unpins. With prepare=True the second round runs the prepared
    statement again with a Bind alone (as psycopg does by itself after prepare_threshold
    runs): it must pin again."""
    router = start_router(pool_size=2)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        for _ in range(2):
            conn.execute(pin, prepare=prepare)
            assert pinned(router) == 1
            conn.execute(unpin)
            assert pinned(router) == 0


_FAILS = psycopg.errors
# Statements, or (statement, the error it must raise).
_UNPIN_SCRIPTS = {
    "rollback": ["BEGIN", "UNLISTEN *", "ROLLBACK"],
    "failed-transaction": [
        "BEGIN", ("SELECT 1/0", _FAILS.DivisionByZero), ("UNLISTEN *", _FAILS.InFailedSqlTransaction), "ROLLBACK",
    ],
    "rollback-to-savepoint": ["BEGIN", "SAVEPOINT s", "UNLISTEN *", "ROLLBACK TO SAVEPOINT s", "COMMIT"],
    "failed-discard-all": [("SET search_path = pin_undo; DISCARD ALL", _FAILS.ActiveSqlTransaction)],
    "committed": ["BEGIN", "UNLISTEN *", "COMMIT"],
}


@pytest.mark.parametrize(
    "script, listening",
    [(_UNPIN_SCRIPTS[name], name != "committed") for name in _UNPIN_SCRIPTS],
    ids=list(_UNPIN_SCRIPTS),
)
def test_an_unpinning_statement_that_does_not_take_effect_keeps_the_pin(start_router, script, listening):
    """UNLISTEN (like RESET ROLE) takes effect when its transaction commits, and a statement
    that fails does nothing: until then the client stays pinned, or its server connection,
    still listening, would go to another client."""
    router = start_router(pool_size=1, query_wait_timeout=1)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        conn.execute("LISTEN pin_undo")
        assert pinned(router) == 1
        for step in script:
            sql, error = (step, None) if isinstance(step, str) else step
            if error is None:
                conn.execute(sql)
            else:
                with pytest.raises(error):
                    conn.execute(sql)
        channels = conn.execute("SELECT pg_listening_channels()").fetchall()
        assert channels == ([("pin_undo",)] if listening else [])
        assert pinned(router) == (1 if listening else 0)


def test_a_pin_is_seen_whatever_the_length_of_the_query(start_router):
    """A Query's text follows its 4-byte length: for one length in four its last byte is a
    letter or digit, which a pattern starting with a word boundary must not take for part of
    the first word (LISTEN was then missed, or UNLISTEN *)."""
    router = start_router(pool_size=2)
    with psycopg.connect(router.dsn("carol"), autocommit=True) as conn:
        for pad in range(256):
            conn.execute("LISTEN pin_len" + " " * pad)
            assert pinned(router) == 1, pad
            conn.execute("UNLISTEN *" + " " * pad)
            assert pinned(router) == 0, pad


_SESSION_FUNCTIONS = """
CREATE FUNCTION pin_fn_plpgsql(p text) RETURNS void LANGUAGE plpgsql AS
  $$BEGIN PERFORM set_config('search_path', p, false); END$$;
CREATE FUNCTION pin_fn_sql(p text) RETURNS text LANGUAGE sql AS
  $$SELECT set_config('search_path', p, false)$$;
CREATE FUNCTION "Pin_Fn_Set"(p text) RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE format('SET search_path = %I', p); END$$;
CREATE FUNCTION pin_fn_none(p text) RETURNS text LANGUAGE plpgsql AS
  $$BEGIN RETURN upper(p); END$$;
CREATE FUNCTION pin_fn_wrapper(p text) RETURNS text LANGUAGE sql AS
  $$SELECT pin_fn_none(p); SELECT pin_fn_sql(p)$$;
"""


@pytest.fixture
def session_functions(cluster):
    """Functions in database app whose bodies change search_path, and one that changes nothing."""
    cluster.psql(_SESSION_FUNCTIONS, dbname="app")
    yield
    cluster.psql(
        "DROP FUNCTION pin_fn_wrapper(text), pin_fn_plpgsql(text), pin_fn_sql(text), \"Pin_Fn_Set\"(text), "
        "pin_fn_none(text)",
        dbname="app",
    )


def _catalog_loaded(router) -> None:
    key = ("main", "app")
    router.wait_for(
        lambda r: r.catalogs.watch(key) is not None and r.catalogs.stats(key).loads >= 1,
        what="the function catalog of app loaded",
    )


@pytest.mark.parametrize(
    "sql, prepare",
    [
        ("SELECT pin_fn_plpgsql('pin_fn')", False),
        ("SELECT pin_fn_plpgsql('pin_fn')", True),
        ("SELECT pin_fn_sql('pin_fn')", False),
        ('SELECT 1; SELECT "public"."Pin_Fn_Set" (\'pin_fn\')', False),
        ("SELECT pin_fn_wrapper('pin_fn')", False),
    ],
    ids=["plpgsql-query", "plpgsql-parse", "sql-function", "quoted-qualified", "through-another-function"],
)
def test_a_function_that_sets_pins_until_its_client_leaves(start_router, session_functions, sql, prepare):
    """A function whose body changes settings (set_config, SET in PL/pgSQL or EXECUTEd) is
    known from pg_proc: calling it pins, as the DO block doing the same would. Without the pin
    the search_path would stay on the server connection for the next client."""
    router = start_router(pool_size=1, query_wait_timeout=1)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    _catalog_loaded(router)
    assert conn.execute("SELECT pin_fn_none('x')").fetchone() == ("X",)
    assert pinned(router) == 0  # a function that sets nothing does not pin
    conn.execute(sql, prepare=prepare)
    assert pinned(router) == 1
    assert conn.execute("SHOW search_path").fetchone() == ("pin_fn",)
    conn.close()
    router.wait_for(lambda r: len(r.pinned_clients) == 0, what="the pin gone with its client")
    with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
        assert other.execute("SHOW search_path").fetchone() == ('"$user", public',)


@pytest.mark.parametrize("prepare", [False, True], ids=["query", "parse"])
def test_a_function_created_through_the_router_pins_at_once(start_router, cluster, prepare):
    """A function that sets, created through the router, pins its callers from the next
    statement on, not only from the next read of pg_proc (every 60 s by default); the catalog
    is read again once the creating transaction has ended."""
    router = start_router(pool_size=1, query_wait_timeout=1)
    conn = psycopg.connect(router.dsn("carol"), autocommit=True)
    try:
        _catalog_loaded(router)
        loads = router.call(lambda r: r.catalogs.stats(("main", "app")).loads)
        conn.execute(
            "CREATE FUNCTION pin_fn_new(p text) RETURNS void LANGUAGE plpgsql AS "
            "$$BEGIN PERFORM set_config('search_path', p, false); END$$",
            prepare=prepare,
        )
        assert pinned(router) == 0  # creating it changes nothing yet
        conn.execute("SELECT pin_fn_new('pin_fn')")
        assert pinned(router) == 1
        conn.close()
        router.wait_for(lambda r: len(r.pinned_clients) == 0, what="the pin gone with its client")
        with psycopg.connect(router.dsn("carol"), autocommit=True) as other:
            assert other.execute("SHOW search_path").fetchone() == ('"$user", public',)
        router.wait_for(lambda r: r.catalogs.stats(("main", "app")).loads > loads, what="pg_proc read again")
        assert "pin_fn_new" in router.call(lambda r: r.catalogs.watch(("main", "app")).catalog.session_functions)
    finally:
        conn.close()
        cluster.psql("DROP FUNCTION IF EXISTS pin_fn_new(text)", dbname="app")
