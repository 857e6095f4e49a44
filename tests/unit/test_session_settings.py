"""SessionSettings (what a transaction-mode client's server connection must carry) and the
pin patterns of the client hot path, without servers."""

from __future__ import annotations

import pytest

from router.frontend.client import _PIN_SQL, _SESSION_SQL, _SQL_PREPARED
from router.session import SessionSettings, _options_settings, set_config_sql


@pytest.mark.parametrize(
    "options, expected",
    [
        ("", {}),
        ("-c search_path=a,b", {"search_path": "a,b"}),
        ("-csearch_path=a", {"search_path": "a"}),
        ("--statement-timeout=5s -c DateStyle=ISO", {"statement_timeout": "5s", "datestyle": "ISO"}),
        ("-c application_name=two\\ words", {"application_name": "two words"}),
        ("-c", {}),
        ("-c novalue", {}),
    ],
)
def test_options_parameter(options, expected):
    assert _options_settings(options) == expected


def test_set_config_sql_quotes_literals():
    assert set_config_sql("a.b", "it's") == "SELECT pg_catalog.set_config('a.b', 'it''s', false)"


def test_no_settings_needs_no_prelude_on_a_clean_server():
    s = SessionSettings({"user": "u", "database": "d"})
    assert s.key is None
    assert s.prelude(None) == []


def test_startup_parameters_are_replayed_and_reset_returns_to_them():
    s = SessionSettings({"user": "u", "application_name": "app", "options": "-c search_path=x"})
    assert s.prelude(None) == [
        "RESET ALL",
        set_config_sql("application_name", "app"),
        set_config_sql("search_path", "x"),
    ]
    startup_key = s.key
    s.set("search_path", "SET search_path = y")
    assert s.key != startup_key
    assert s.prelude(startup_key)[-1] == "SET search_path = y"
    s.reset("search_path")
    assert s.key == startup_key
    s.set("timezone", "SET TimeZone = 'UTC'")
    s.reset_all()
    assert s.key == startup_key
    assert s.prelude(startup_key) == []


def test_another_clients_settings_are_reset_even_when_we_have_none():
    ours = SessionSettings({"user": "u"})
    theirs = SessionSettings({"user": "v", "application_name": "other"})
    assert ours.prelude(theirs.key) == ["RESET ALL"]


@pytest.mark.parametrize(
    "sql, pins",
    [
        ("LISTEN ch", ["LISTEN"]),
        ("UNLISTEN *", ["UNLISTEN *"]),
        ("unlisten ch", []),
        ("SELECT pg_advisory_lock(1)", ["pg_advisory_lock"]),
        ("SELECT pg_try_advisory_lock_shared(1, 2)", ["pg_try_advisory_lock_shared"]),
        ("SELECT pg_advisory_xact_lock(1)", []),
        ("SELECT pg_advisory_unlock_all()", ["pg_advisory_unlock_all"]),
        ("CREATE TEMP TABLE t (x int)", ["CREATE TEMP TABLE"]),
        ("create global temporary table t (x int)", ["create global temporary table"]),
        ("CREATE TABLE t (x int)", []),
        ("SELECT 1 INTO TEMP t", ["INTO TEMP"]),
        ("create or replace temporary recursive view v(x) as select 1", ["create or replace temporary recursive view"]),
        ("CREATE TEMP SEQUENCE s", ["CREATE TEMP SEQUENCE"]),
        ("CREATE VIEW pg_temp.v AS SELECT 1", ["pg_temp."]),
        ("INSERT INTO temp_log VALUES (1)", []),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", ["WITH HOLD"]),
        ("SET ROLE r", ["SET ROLE"]),
        ("SET SESSION AUTHORIZATION r", ["SET SESSION AUTHORIZATION"]),
        ("RESET ROLE", ["RESET ROLE"]),
        ("DISCARD ALL", ["DISCARD ALL"]),
        ("SELECT listening FROM t", []),
    ],
)
def test_pin_patterns(sql, pins):
    assert [m.group(0).decode() for m in _PIN_SQL.finditer(sql.encode())] == pins


@pytest.mark.parametrize(
    "sql, session, refused",
    [
        ("SET x = 1", True, False),
        ("  reset all", True, False),
        ("DISCARD ALL", True, False),
        ("PREPARE q AS SELECT 1", True, True),
        ("EXECUTE q", True, True),
        ("DEALLOCATE q", True, True),
        ("DEALLOCATE ALL", True, False),
        ("DEALLOCATE PREPARE ALL", True, False),
        ("PREPARE TRANSACTION 'x'", True, False),
        ("SELECT 1", False, False),
        ("settle", False, False),
        ("DO $$BEGIN SET x.y = 1; END$$", True, False),
        ("double_it()", False, False),
    ],
)
def test_query_prefilters(sql, session, refused):
    data = sql.encode()
    assert bool(_SESSION_SQL.match(data)) is session
    assert bool(_SQL_PREPARED.match(data)) is refused


def test_a_snapshot_restores_settings_and_key():
    s = SessionSettings({"application_name": "app"})
    before = s.snapshot()
    s.set("search_path", "SET search_path = x")
    s.reset("application_name")
    changed = s.key
    assert changed != before[1]
    # The prelude for the settings before the change, while the change itself is pending.
    assert s.prelude(None, before) == ["RESET ALL", set_config_sql("application_name", "app")]
    assert s.prelude(before[1], before) == []
    s.restore(before)
    assert s.key == before[1]
    assert s.prelude(None) == ["RESET ALL", set_config_sql("application_name", "app")]
    # The snapshot is a copy: restoring does not tie the session to it.
    s.set("search_path", "SET search_path = y")
    assert before[0] == {"application_name": set_config_sql("application_name", "app")}


def test_restore_sql_names_each_startup_setting_once_quoted():
    session = SessionSettings({"user": "u", "application_name": "it's", "options": "-c TimeZone=UTC -c app.t=4"})
    sql = session.restore_sql()
    assert "('application_name', 'it''s'), ('timezone', 'UTC'), ('app.t', '4')" in sql
    assert "s.source <> 'session'" in sql
    assert SessionSettings({"user": "u", "database": "d"}).restore_sql() is None
