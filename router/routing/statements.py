"""One statement of the parse tree -> ``StatementInfo``: its target, reason and kind.

Dispatch is on the node type of the statement (libpg_query's JSON, see expressions.py).
Statements that change transaction or session state are in session_statements.py.

* Reads (SELECT, VALUES, TABLE) are REPLICA unless the expression scan finds a reason for
  the primary: a locking clause, a writable CTE, a writer, volatile or unknown function
  anywhere in them. ``SELECT ... INTO`` creates a table (SELECT_INTO).
* INSERT/UPDATE/DELETE/MERGE: WRITE. CREATE/ALTER/DROP/GRANT/COMMENT/TRUNCATE...: DDL.
  VACUUM/ANALYZE/CLUSTER/REINDEX/REFRESH/CHECKPOINT/LOAD: MAINTENANCE. LOCK: LOCK.
  CALL and DO: CALL_DO (their bodies are opaque; a DO body that may change settings is kind
  DO_SESSION). LISTEN/UNLISTEN/NOTIFY: a standby refuses all three. Any other statement type:
  UNKNOWN, so a type added to a later parser goes to the primary until someone decides
  otherwise.
* EXPLAIN without ANALYZE plans but never executes: a read, whatever it explains. EXPLAIN
  ANALYZE runs the statement, so it gets the explained statement's verdict.
* COPY ... FROM writes. COPY ... TO STDOUT of a table is a read; of a query, the query's
  verdict. COPY ... TO a server file or PROGRAM goes to the primary (COPY_TO_FILE): the side
  effect is on a server host, and the client means the primary's.
* ``PREPARE name AS stmt`` gets the verdict of ``stmt`` (kind PREPARE) so the session can
  remember it by name. ``EXECUTE name`` is PRIMARY with reason PREPARED_STATEMENT, which the
  session may replace by the remembered verdict; its parameters are scanned like any
  expression, and when they need the primary the reason is theirs instead.
  ``DECLARE c CURSOR FOR q`` gets the verdict of ``q``; FETCH, MOVE and CLOSE follow the
  cursor (replica-compatible, reason CURSOR).
* Every statement is scanned for set_config() calls, writes and DDL included, except what
  EXPLAIN without ANALYZE wraps, which does not run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

from pglast.parser import ParseError, parse_sql_json

from router.routing.expressions import DML_NODES, ExpressionScan
from router.routing.functions import FunctionCatalog, call_pattern
from router.routing.session_statements import SESSION_HANDLERS, parse_bool
from router.routing.verdict import (
    ROUTER_TARGET_GUC,
    SUSPECTED_WRITE_REASONS,
    Reason,
    StatementInfo,
    StatementKind,
    Target,
    Verdict,
)

Kind = StatementKind

# In a DO body: a statement that starts with SET/RESET/DISCARD (first in the block, after a
# ';', a block keyword, or an opening quote or parenthesis, as in EXECUTE 'SET ...' or
# format('SET ...')), or a set_config() call. Generous, like pinning; an UPDATE's SET clause
# follows a name and does not match.
_SESSION_IN_BODY = re.compile(
    r"(?i)set_config|(?:^|[;'(]|\b(?:begin|then|else|loop)\b)\s*(?:set|reset|discard)\b"
)


def body_may_change_session(source: str) -> bool:
    """Whether a DO block's or a function's source may change session settings (a SET, RESET
    or DISCARD statement, or a set_config call): the same generous look for both."""
    return _SESSION_IN_BODY.search(source) is not None


def created_routines(sql: str) -> list[tuple[str, str | None]]:
    """The CREATE [OR REPLACE] FUNCTION / PROCEDURE statements of ``sql``, each as (name as
    pg_proc will spell it, lowercased; source as pg_proc's prosrc will hold it, None for C
    and internal ones). For a body in SQL-standard form (BEGIN ATOMIC, RETURN) the source is
    the whole text. Empty when the text does not parse."""
    try:
        tree = json.loads(parse_sql_json(sql))
    except ParseError:
        return []
    routines: list[tuple[str, str | None]] = []
    for raw in tree.get("stmts", ()):
        body = raw.get("stmt", {}).get("CreateFunctionStmt")
        if body is None:
            continue
        name = body["funcname"][-1]["String"]["sval"].lower()
        language, source = "sql", None
        for option in body.get("options", ()):
            element = option.get("DefElem", {})
            arg = element.get("arg", {})
            if element.get("defname") == "language":
                language = arg.get("String", {}).get("sval", "").lower()
            elif element.get("defname") == "as":
                items = arg.get("List", {}).get("items", ())
                source = items[0].get("String", {}).get("sval") if items else None
        if "sql_body" in body:
            source = sql
        routines.append((name, None if language in ("c", "internal") else source))
    return routines


def created_session_functions(sql: str, catalog: FunctionCatalog) -> set[str]:
    """The names of the functions ``sql`` creates whose body may change session settings,
    itself or by calling a function ``catalog`` knows may."""
    calls = catalog.session_calls
    return {
        name
        for name, source in created_routines(sql)
        if source is not None
        and (body_may_change_session(source) or (calls is not None and calls.search(source.encode()) is not None))
    }


def functions_that_may_change_session(functions: Iterable[tuple[str, str | None]]) -> set[str]:
    """The names (lowercased) among ``(name, source)`` pairs of the functions whose body may
    change session settings, itself or by calling one that may, by name, however deep: a
    wrapper of ``app.set_tenant()`` leaves the setting on the connection just the same.
    Functions without a source (C, internal) are taken not to."""
    sources: dict[str, list[str]] = {}
    for name, source in functions:
        if source is not None:
            sources.setdefault(name.lower(), []).append(source)
    found = {name for name, bodies in sources.items() if any(body_may_change_session(b) for b in bodies)}
    encoded = {name: [body.encode() for body in bodies] for name, bodies in sources.items()}
    added = found
    while added:
        # A call of one just found, as the client hot path looks for it in a query.
        calls = call_pattern(added)
        added = {
            name
            for name, bodies in encoded.items()
            if name not in found and any(calls.search(body) for body in bodies)
        }
        found |= added
    return found


_DDL_PREFIXES = ("Create", "Alter", "Drop")  # CreateStmt, AlterTableStmt, DropdbStmt...
_DDL_OTHERS = frozenset(
    {
        "GrantStmt",
        "GrantRoleStmt",
        "CommentStmt",
        "SecLabelStmt",
        "TruncateStmt",
        "RenameStmt",
        "IndexStmt",
        "ViewStmt",
        "RuleStmt",
        "DefineStmt",
        "CompositeTypeStmt",
        "ReassignOwnedStmt",
        "ImportForeignSchemaStmt",
        "ReplicaIdentityStmt",
    }
)
_MAINTENANCE = frozenset(
    {
        "VacuumStmt",  # VACUUM and ANALYZE
        "ClusterStmt",
        "ReindexStmt",
        "RefreshMatViewStmt",
        "CheckPointStmt",
        "LoadStmt",
    }
)


def classify_statement(node: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    """The verdict of one statement node ``{"SelectStmt": {...}}`` whose source is ``text``."""
    ((node_type, body),) = node.items()
    handler = _HANDLERS.get(node_type)
    if handler is not None:
        return handler(body, text, expressions)
    if node_type in DML_NODES:
        return _primary(Reason.WRITE, body, text, expressions)
    if node_type.startswith(_DDL_PREFIXES) or node_type in _DDL_OTHERS:
        return _primary(Reason.DDL, body, text, expressions)
    if node_type in _MAINTENANCE:
        return _primary(Reason.MAINTENANCE, body, text, expressions)
    return _primary(Reason.UNKNOWN, body, text, expressions)


def _primary(reason: Reason, body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    expressions.strongest_finding(body)  # for set_config() only: the target is decided
    return StatementInfo(Verdict(Target.PRIMARY, reason), text)


def _select(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    expressions.note_select(body)
    finding = expressions.strongest_finding(body)
    if "intoClause" in body:
        return StatementInfo(Verdict(Target.PRIMARY, Reason.SELECT_INTO), text)
    if finding is not None:
        return StatementInfo(Verdict(Target.PRIMARY, finding), text)
    return StatementInfo(Verdict(Target.REPLICA, Reason.READ), text)


def _explain(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    analyze = False
    for option in body.get("options", ()):
        elem = option.get("DefElem", {})
        if elem.get("defname") == "analyze":
            analyze = _option_true(elem.get("arg"))
    if not analyze:
        return StatementInfo(Verdict(Target.REPLICA, Reason.READ), text)
    return StatementInfo(_inner_verdict(body["query"], text, expressions), text)


def _copy(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    if body.get("is_from"):
        return _primary(Reason.COPY_FROM, body, text, expressions)
    if "query" in body:
        verdict = _inner_verdict(body["query"], text, expressions)
    else:
        verdict = Verdict(Target.REPLICA, Reason.READ)
    if body.get("filename") is not None or body.get("is_program"):
        if verdict.target is Target.REPLICA or verdict.reason in SUSPECTED_WRITE_REASONS:
            verdict = Verdict(Target.PRIMARY, Reason.COPY_TO_FILE)
    return StatementInfo(verdict, text)


def _call(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    return _primary(Reason.CALL_DO, body, text, expressions)


def _do(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    """DO: its body is opaque, but one that may change settings (a SET or RESET statement,
    in PL/pgSQL or a string it EXECUTEs, or set_config) is marked DO_SESSION."""
    for arg in body.get("args", ()):
        elem = arg.get("DefElem", {})
        if elem.get("defname") == "as":
            source = (elem.get("arg") or {}).get("String", {}).get("sval", "")
            if body_may_change_session(source):
                return StatementInfo(Verdict(Target.PRIMARY, Reason.CALL_DO, Kind.DO_SESSION), text)
    return _primary(Reason.CALL_DO, body, text, expressions)


def _lock(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    return StatementInfo(Verdict(Target.PRIMARY, Reason.LOCK), text)


def _show(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    name = body.get("name", "").lower()
    if name == ROUTER_TARGET_GUC:
        return StatementInfo(Verdict(Target.REPLICA, Reason.READ, Kind.SHOW_ROUTER_TARGET), text, name)
    return StatementInfo(Verdict(Target.REPLICA, Reason.READ), text)


def _listen(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    verdict = Verdict(Target.PRIMARY, Reason.LISTEN_NOTIFY, Kind.LISTEN)
    return StatementInfo(verdict, text, body.get("conditionname"))


def _unlisten(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    verdict = Verdict(Target.PRIMARY, Reason.LISTEN_NOTIFY, Kind.UNLISTEN)
    return StatementInfo(verdict, text, body.get("conditionname"))  # None: UNLISTEN *


def _notify(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    verdict = Verdict(Target.PRIMARY, Reason.LISTEN_NOTIFY)
    return StatementInfo(verdict, text, body.get("conditionname"))


def _prepare(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    inner = _inner_verdict(body["query"], text, expressions)
    verdict = Verdict(inner.target, inner.reason, Kind.PREPARE)
    return StatementInfo(verdict, text, body.get("name"))


def _execute(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    reason = expressions.strongest_finding(body.get("params", ())) or Reason.PREPARED_STATEMENT
    return StatementInfo(Verdict(Target.PRIMARY, reason, Kind.EXECUTE), text, body.get("name"))


def _declare_cursor(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    inner = _inner_verdict(body["query"], text, expressions)
    verdict = Verdict(inner.target, inner.reason, Kind.DECLARE_CURSOR)
    return StatementInfo(verdict, text, body.get("portalname"))


def _fetch(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    verdict = Verdict(Target.REPLICA, Reason.CURSOR, Kind.FETCH)  # FETCH and MOVE
    return StatementInfo(verdict, text, body.get("portalname"))


def _close(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    verdict = Verdict(Target.REPLICA, Reason.CURSOR, Kind.CLOSE_CURSOR)
    return StatementInfo(verdict, text, body.get("portalname"))  # None: CLOSE ALL


_HANDLERS: dict[str, Callable[[dict, str, ExpressionScan], StatementInfo]] = {
    "SelectStmt": _select,
    "ExplainStmt": _explain,
    "CopyStmt": _copy,
    "CallStmt": _call,
    "DoStmt": _do,
    "LockStmt": _lock,
    "VariableShowStmt": _show,
    "ListenStmt": _listen,
    "UnlistenStmt": _unlisten,
    "NotifyStmt": _notify,
    "PrepareStmt": _prepare,
    "ExecuteStmt": _execute,
    "DeclareCursorStmt": _declare_cursor,
    "FetchStmt": _fetch,
    "ClosePortalStmt": _close,
    **SESSION_HANDLERS,
}


def _inner_verdict(node: dict, text: str, expressions: ExpressionScan) -> Verdict:
    """Target and reason of a statement wrapped in EXPLAIN ANALYZE, COPY, PREPARE, DECLARE."""
    inner = classify_statement(node, text, expressions).verdict
    return Verdict(inner.target, inner.reason)


def _option_true(arg: dict | None) -> bool:
    """An EXPLAIN option's value as defGetBoolean reads it; unreadable counts as true."""
    if arg is None:
        return True
    if "Integer" in arg:
        return arg["Integer"].get("ival", 0) != 0
    if "String" in arg:
        value = parse_bool(arg["String"].get("sval", ""))
        return True if value is None else value
    return True
