"""Leading routing hints: recognising the comment, and what a hint may override."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.routing.hints import apply_hint, leading_hint
from router.routing.verdict import SUSPECTED_WRITE_REASONS, Reason, StatementKind, Target, Verdict

P = Target.PRIMARY
R = Target.REPLICA


@pytest.mark.parametrize(
    ("sql", "hint"),
    [
        ("/* pgrouter: primary */ SELECT 1", P),
        ("/* pgrouter: replica */ SELECT 1", R),
        ("/*pgrouter:replica*/SELECT 1", R),
        ("/* PgRouter : PRIMARY */", P),
        ("/*\n\tpgrouter\n:\nreplica\n*/ SELECT 1", R),
        ("-- pgrouter: replica\nSELECT 1", R),
        ("--pgrouter:primary\r\nSELECT 1", P),
        ("-- pgrouter: replica", R),
        ("  ;\n /* pgrouter: replica */ SELECT 1", R),
        ("/* first */ -- second\n /* pgrouter: primary */ SELECT 1", P),
        ("/* pgrouter: replica */ /* pgrouter: primary */ SELECT 1", R),
        ("/* outer /* pgrouter: primary */ */ SELECT 1", None),  # a nested comment is not the body
        ("/* outer /* inner */ */ /* pgrouter: primary */ SELECT 1", P),
        ("SELECT 1 /* pgrouter: primary */", None),
        ("SELECT /* pgrouter: primary */ 1", None),
        ("/* pgrouter: master */ SELECT 1", None),
        ("/* pgrouter replica */ SELECT 1", None),
        ("/* pgrouter: replica; */ SELECT 1", None),
        ("/* x pgrouter: replica */ SELECT 1", None),
        ("/* pgrouter: replica", None),  # unterminated
        ("-", None),
        ("", None),
        ("'/* pgrouter: primary */'", None),
    ],
)
def test_leading_hint(sql: str, hint: Target | None):
    assert leading_hint(sql) is hint


@pytest.mark.parametrize("reason", sorted(SUSPECTED_WRITE_REASONS))
def test_replica_hint_overrides_suspicions(reason: Reason):
    verdict = Verdict(P, reason, StatementKind.PLAIN)
    assert apply_hint(verdict, R) == Verdict(R, Reason.HINT, StatementKind.PLAIN)


@pytest.mark.parametrize("reason", sorted(set(Reason) - SUSPECTED_WRITE_REASONS))
def test_replica_hint_keeps_definite_writes_on_the_primary(reason: Reason):
    verdict = Verdict(P, reason, StatementKind.BEGIN)
    assert apply_hint(verdict, R) is verdict


@pytest.mark.parametrize("reason", list(Reason))
@pytest.mark.parametrize("target", list(Target))
def test_primary_hint_always_wins_and_keeps_the_kind(reason: Reason, target: Target):
    verdict = Verdict(target, reason, StatementKind.SET_SESSION)
    assert apply_hint(verdict, P) == Verdict(P, Reason.HINT, StatementKind.SET_SESSION)


@given(st.text(max_size=100))
def test_leading_hint_never_raises(sql: str):
    assert leading_hint(sql) in (None, P, R)
