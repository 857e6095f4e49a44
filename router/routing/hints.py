"""Routing hints: a leading ``/* pgrouter: primary */`` or ``/* pgrouter: replica */``.

Syntax: a block comment (``/* ... */``, nested comments allowed as in PostgreSQL) or a line
comment (``-- ...`` to the end of the line) whose whole body is ``pgrouter``, a colon and
``primary`` or ``replica``: case-insensitive, whitespace anywhere around the words
(``/*PGROUTER:Replica*/`` counts, ``/* pgrouter: replica, please */`` does not). The comment
must come before the first statement of the message, among whitespace, semicolons and other
comments; the first hint there counts. Comments later in the message (after or between
statements, or sqlcommenter-style at the end) are not hints.

Scope: a hint applies to every statement of the message it leads. Per-statement hints inside a
multi-statement Query would need per-statement semantics nobody has asked for.

What a hint can do (the issue says hints override; PgCat and Supavisor let the hint win):

* ``primary``: every statement goes to the primary, reason HINT. Always honoured.
* ``replica``: honoured for statements the parser found replica-compatible, and for those sent
  to the primary only because the classifier cannot tell whether they write
  (``verdict.SUSPECTED_WRITE_REASONS``: unknown or volatile functions, CALL/DO, EXECUTE,
  BEGIN without READ ONLY, unparsable text...). The client knows its functions better than we
  do, and if it is wrong the replica refuses the write with SQLSTATE 25006
  (read_only_sql_transaction), so no data is at risk.
  Not honoured for a statement that parses as a write or needs the primary (INSERT, DDL,
  FOR UPDATE, nextval, advisory locks, LISTEN, COPY FROM, SERIALIZABLE...): it still goes to
  the primary with its own reason, because on a replica it could only fail (or, for advisory
  locks, silently lock nothing the primary's sessions can see).

A statement whose target the hint decided gets reason HINT; its kind is unchanged, so the
session still sees BEGIN, SET, COMMIT... Whether a hint was present at all is
``Classification.hint``.
"""

from __future__ import annotations

from router.routing.verdict import SUSPECTED_WRITE_REASONS, Reason, Target, Verdict

_HINT_NAME = "pgrouter"
_HINT_TARGETS = {"primary": Target.PRIMARY, "replica": Target.REPLICA}
_SKIPPED = frozenset(" \t\n\r\f\v;")


def leading_hint(sql: str) -> Target | None:
    """The target named by the first hint comment before the first statement, if any."""
    i = 0
    n = len(sql)
    while i < n:
        c = sql[i]
        if c in _SKIPPED:
            i += 1
        elif sql.startswith("/*", i):
            end = _block_comment_end(sql, i)
            if end < 0:
                return None  # unterminated: the server rejects the whole text anyway
            target = _hint_target(sql[i + 2 : end - 2])
            if target is not None:
                return target
            i = end
        elif sql.startswith("--", i):
            end = i + 2
            while end < n and sql[end] not in "\n\r":
                end += 1
            target = _hint_target(sql[i + 2 : end])
            if target is not None:
                return target
            i = end
        else:
            return None
    return None


def apply_hint(verdict: Verdict, hint: Target) -> Verdict:
    """``verdict`` as a message-leading ``hint`` changes it (see the module docstring)."""
    if hint is Target.REPLICA and verdict.target is Target.PRIMARY:
        if verdict.reason not in SUSPECTED_WRITE_REASONS:
            return verdict
    return Verdict(hint, Reason.HINT, verdict.kind)


def _block_comment_end(sql: str, start: int) -> int:
    """Index just past the ``*/`` closing the comment opened at ``start``; -1 if none.

    Block comments nest in PostgreSQL (docs, "Lexical Structure" > "Comments"), unlike in the
    SQL standard.
    """
    depth = 0
    i = start
    n = len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return -1


def _hint_target(body: str) -> Target | None:
    name, colon, value = body.partition(":")
    if not colon or name.strip().lower() != _HINT_NAME:
        return None
    return _HINT_TARGETS.get(value.strip().lower())
