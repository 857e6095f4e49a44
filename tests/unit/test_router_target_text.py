"""SET / RESET pgrouter.target found by PostgreSQL's tokens in any text, and the text a server
gets instead (router/routing/session_statements.py). No I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.routing.classify import classify
from router.routing.functions import FunctionCatalog, builtin_rows
from router.routing.session_statements import (
    ROUTER_TARGET_ON_SERVER,
    ROUTER_TARGET_RESET_ON_SERVER,
    router_target_sets,
    router_targets_for_server,
)
from router.routing.verdict import StatementKind

CATALOG = FunctionCatalog.from_rows(builtin_rows())


def refuse(value: str) -> str:
    return f"REFUSED({value})"


# (text, [(statement as found, value, reset)])
FOUND = [
    ("SET pgrouter.target = primary", [("SET pgrouter.target = primary", "primary", False)]),
    ("set session PGROUTER.target TO Replica;", [("set session PGROUTER.target TO Replica", "replica", False)]),
    ("SET \"pgrouter\".\"target\" = 'AUTO'", [("SET \"pgrouter\".\"target\" = 'AUTO'", "auto", False)]),
    ("SET pgrouter.target TO DEFAULT", [("SET pgrouter.target TO DEFAULT", "auto", False)]),
    ('SET pgrouter.target = "DEFAULT"', [('SET pgrouter.target = "DEFAULT"', "default", False)]),
    ("RESET pgrouter.target", [("RESET pgrouter.target", "auto", True)]),
    ("  /* a */ SET pgrouter.target = primary -- b\n", [("SET pgrouter.target = primary", "primary", False)]),
    ("SET pgrouter.target = sideways", [("SET pgrouter.target = sideways", "sideways", False)]),
    ("SET pgrouter.target = 1.5", [("SET pgrouter.target = 1.5", "1.5", False)]),
    ("SET pgrouter.target = replica, primary", [("SET pgrouter.target = replica, primary", "replica, primary", False)]),
    (
        "SELECT 1; SET pgrouter.target = primary; SELECT 2; reset pgrouter.target",
        [("SET pgrouter.target = primary", "primary", False), ("reset pgrouter.target", "auto", True)],
    ),
    # Not the router's setting, or not a statement of its own.
    ("SET LOCAL pgrouter.target = primary", []),
    ("SET pgrouter.targets = primary", []),
    ("SET other.target = primary", []),
    ("SHOW pgrouter.target", []),
    ("SELECT 'SET pgrouter.target = primary'", []),
    ("SELECT $$; SET pgrouter.target = primary; $$", []),
    ("/* SET pgrouter.target = primary; */ SELECT 1", []),
    ("-- SET pgrouter.target = primary\nSELECT 1", []),
    ("SELECT 1 AS \"SET pgrouter.target = primary\"", []),
    ("UPDATE t SET pgrouter.target = 1", []),
    ("SET pgrouter.target = 'unterminated", []),
    ("", []),
]


@pytest.mark.parametrize(("sql", "expected"), FOUND)
def test_found_by_tokens(sql: str, expected: list) -> None:
    found = router_target_sets(sql)
    assert [(sql[f.start : f.end], f.value, f.reset) for f in found] == expected


# (text, text sent, text that runs before a refusal, values, lone)
SENT = [
    ("SET pgrouter.target = primary", ROUTER_TARGET_ON_SERVER, None, ("primary",), True),
    ("SET pgrouter.target = replica;  ", ROUTER_TARGET_ON_SERVER + ";  ", None, ("replica",), True),
    ("RESET pgrouter.target", ROUTER_TARGET_RESET_ON_SERVER, None, ("auto",), True),
    (
        "SET pgrouter.target = primary; SELECT 7",
        ROUTER_TARGET_ON_SERVER + "; SELECT 7",
        None,
        ("primary",),
        False,
    ),
    (
        "BEGIN; SET pgrouter.target TO replica; RESET pgrouter.target; COMMIT",
        f"BEGIN; {ROUTER_TARGET_ON_SERVER}; {ROUTER_TARGET_RESET_ON_SERVER}; COMMIT",
        None,
        ("replica", "auto"),
        False,
    ),
    ("SET pgrouter.target = sideways", "REFUSED(sideways)", "", (), True),
    (
        "SET pgrouter.target = primary; SET pgrouter.target = x; SELECT 1/0; SET pgrouter.target = auto",
        ROUTER_TARGET_ON_SERVER + "; REFUSED(x)",
        ROUTER_TARGET_ON_SERVER + "; ",
        ("primary",),
        False,
    ),
    ("/* hint */ SET pgrouter.target = primary", "/* hint */ " + ROUTER_TARGET_ON_SERVER, None, ("primary",), False),
]


@pytest.mark.parametrize(("sql", "sent", "runs", "values", "lone"), SENT)
def test_text_for_the_server(sql: str, sent: str, runs: str | None, values: tuple, lone: bool) -> None:
    out = router_targets_for_server(sql, refuse)
    assert out is not None
    assert (out.sql, out.runs, out.values, out.lone) == (sent, sent if runs is None else runs, values, lone)


def test_nothing_to_replace() -> None:
    assert router_targets_for_server("SELECT 1; SET search_path = a", refuse) is None


def test_what_runs_is_tracked_as_the_values_written() -> None:
    """The placeholders classify as router-target statements, one per value, in order: the
    session reads each as the value it stands for."""
    out = router_targets_for_server("SET pgrouter.target = primary; SELECT 1; RESET pgrouter.target", refuse)
    kinds = [s.verdict.kind for s in classify(out.runs, CATALOG).statements]
    assert kinds.count(StatementKind.ROUTER_TARGET) == len(out.values) == 2


WORDS = st.sampled_from(
    ["SET", "RESET", "SESSION", "LOCAL", "pgrouter", ".", "target", "=", "TO", "primary", "replica", "auto",
     "DEFAULT", "'replica'", '"target"', ";", "SELECT", "1", "$$", "'", "/*", "*/", "--", "\n", "sideways"]
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=120), st.lists(WORDS, max_size=20).map(" ".join)))
def test_never_raises_and_never_sends_the_text_as_written(sql: str) -> None:
    out = router_targets_for_server(sql, refuse)
    if out is None:
        assert router_target_sets(sql) == []
        return
    # What is sent sets pgrouter.target only through the placeholders, which PostgreSQL takes.
    for found in router_target_sets(out.sql):
        assert out.sql[found.start : found.end] in (ROUTER_TARGET_ON_SERVER, ROUTER_TARGET_RESET_ON_SERVER)
    assert out.sql.startswith(out.runs)


# Session pooling (keep_values): (text, text sent)
SENT_KEEPING_VALUES = [
    ("SET pgrouter.target = primary", "SET pgrouter.target TO 'primary'"),
    ("set session PGROUTER.target TO Replica;", "SET pgrouter.target TO 'replica';"),
    ("SET pgrouter.target TO DEFAULT", "SET pgrouter.target TO 'auto'"),
    ("SET pgrouter.target = 'auto'; SELECT 7", "SET pgrouter.target TO 'auto'; SELECT 7"),
    ("RESET pgrouter.target", ROUTER_TARGET_RESET_ON_SERVER),
    ("SET pgrouter.target = replica; SET pgrouter.target = x; SELECT 1", "SET pgrouter.target TO 'replica'; REFUSED(x)"),
]


@pytest.mark.parametrize(("sql", "sent"), SENT_KEEPING_VALUES)
def test_text_for_a_session_keeps_the_value(sql: str, sent: str) -> None:
    out = router_targets_for_server(sql, refuse, keep_values=True)
    assert out is not None and out.sql == sent
    # What the server gets is still a router-target statement of the same value.
    infos = [s for s in classify(out.runs, CATALOG).statements if s.verdict.kind is StatementKind.ROUTER_TARGET]
    assert tuple(info.value for info in infos) == out.values


@settings(max_examples=300, deadline=None)
@given(st.lists(WORDS, max_size=20).map(" ".join))
def test_a_session_text_sets_only_valid_values(sql: str) -> None:
    out = router_targets_for_server(sql, refuse, keep_values=True)
    if out is None:
        return
    assert [found.value for found in router_target_sets(out.runs)] == list(out.values)
