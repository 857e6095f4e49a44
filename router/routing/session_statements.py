"""Statements that change transaction or session state: what the session layer must track.

Transaction control (BEGIN, COMMIT, SAVEPOINT, SET TRANSACTION...), session parameters (SET,
RESET, DISCARD, DEALLOCATE) and the router's own ``pgrouter.target``. Their targets:

* BEGIN / START TRANSACTION: PRIMARY (TRANSACTION_BEGIN_READ_WRITE) unless READ ONLY, then
  REPLICA (TRANSACTION_BEGIN_READ_ONLY). The options are read from the parse tree
  (``transaction_read_only`` = 1), never from the text.
* SERIALIZABLE: a hot standby refuses it ("cannot use serializable mode in a hot standby",
  even READ ONLY), so BEGIN/SET TRANSACTION ... SERIALIZABLE go to the primary (SERIALIZABLE).
* COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION (non-serializable), SET CONSTRAINTS, SET,
  RESET, DISCARD, DEALLOCATE: replica-compatible. They do not choose a node; the session runs
  them where the transaction or session already is (see verdict.py).
* ``SET transaction_read_only = on`` is SET TRANSACTION READ ONLY spelt as a GUC, and
  ``SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY`` is
  ``SET default_transaction_read_only = on``: each gets the same kind as its twin.
* ``SET [SESSION] pgrouter.target = primary|replica|auto``, ``RESET pgrouter.target`` and
  ``SET pgrouter.target TO DEFAULT`` (= auto) are ROUTER_TARGET: the session intercepts them.
  PRIMARY is a reserved word, so ``SET pgrouter.target = primary`` does not parse; a message
  that is exactly that statement is recognised from PostgreSQL's own tokens.
  ``SET LOCAL pgrouter.target`` is an ordinary SET_LOCAL (PostgreSQL accepts and ignores it):
  the transaction already runs somewhere, so a transaction-scoped routing choice means nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from pglast.parser import ParseError, scan

from router.routing.expressions import ExpressionScan, integer_constant, parse_bool, string_constant
from router.routing.verdict import (
    ROUTER_TARGET_GUC,
    Reason,
    StatementInfo,
    StatementKind,
    Target,
    Verdict,
)

Kind = StatementKind


def transaction(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    kind = body.get("kind")
    if kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
        read_only, serializable = _transaction_modes(body.get("options", ()))
        if serializable:
            begin = Kind.BEGIN_READ_ONLY if read_only else Kind.BEGIN
            return StatementInfo(Verdict(Target.PRIMARY, Reason.SERIALIZABLE, begin), text)
        if read_only:
            verdict = Verdict(
                Target.REPLICA, Reason.TRANSACTION_BEGIN_READ_ONLY, Kind.BEGIN_READ_ONLY
            )
            return StatementInfo(verdict, text)
        verdict = Verdict(Target.PRIMARY, Reason.TRANSACTION_BEGIN_READ_WRITE, Kind.BEGIN)
        return StatementInfo(verdict, text)
    chain = bool(body.get("chain"))
    if kind == "TRANS_STMT_COMMIT":
        return _control(Kind.COMMIT_AND_CHAIN if chain else Kind.COMMIT, text)
    if kind == "TRANS_STMT_ROLLBACK":
        return _control(Kind.ROLLBACK_AND_CHAIN if chain else Kind.ROLLBACK, text)
    if kind in ("TRANS_STMT_SAVEPOINT", "TRANS_STMT_RELEASE", "TRANS_STMT_ROLLBACK_TO"):
        return _control(Kind.SAVEPOINT, text, body.get("savepoint_name"))
    if kind == "TRANS_STMT_PREPARE":
        verdict = Verdict(Target.PRIMARY, Reason.TWO_PHASE, Kind.PREPARE_TRANSACTION)
        return StatementInfo(verdict, text, body.get("gid"))
    if kind in ("TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"):
        return StatementInfo(Verdict(Target.PRIMARY, Reason.TWO_PHASE), text, body.get("gid"))
    return StatementInfo(Verdict(Target.PRIMARY, Reason.UNKNOWN), text)


def variable_set(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    set_kind = body.get("kind")
    name = body.get("name", "").lower()  # GUC names are case-insensitive
    local = bool(body.get("is_local"))
    if set_kind == "VAR_RESET_ALL":
        return _session(Kind.RESET_ALL, text)
    if set_kind == "VAR_SET_MULTI":
        return _set_multi(name, body.get("args", ()), text)
    resetting = set_kind in ("VAR_RESET", "VAR_SET_DEFAULT")
    value = _render_value(body.get("args", ())) if set_kind == "VAR_SET_VALUE" else None
    if name == ROUTER_TARGET_GUC and not local:
        routed = "auto" if resetting else (value.lower() if value is not None else None)
        return _session(Kind.ROUTER_TARGET, text, name, routed)
    if name == "transaction_read_only" and value is not None:
        read_only = parse_bool(value)
        if read_only is not None:
            return _set_transaction(read_only, False, text)
    if name == "transaction_isolation" and value is not None:
        return _set_transaction(None, value.lower() == "serializable", text)
    if resetting:
        return _session(Kind.SET_LOCAL, text, name) if local else _session(Kind.RESET, text, name)
    if name == "default_transaction_read_only" and not local and value is not None:
        read_only = parse_bool(value)
        if read_only is not None:
            return _session(Kind.SET_DEFAULT_READ_ONLY, text, name, value, read_only)
    return _session(Kind.SET_LOCAL if local else Kind.SET_SESSION, text, name, value)


def discard(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    target = body.get("target", "DISCARD_ALL")
    if target == "DISCARD_ALL":
        return _session(Kind.DISCARD_ALL, text)
    return _session(Kind.DISCARD, text, target.removeprefix("DISCARD_").lower())


def deallocate(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    if body.get("isall"):
        return _session(Kind.DEALLOCATE_ALL, text)
    return _session(Kind.DEALLOCATE, text, body.get("name"))


def constraints_set(body: dict, text: str, expressions: ExpressionScan) -> StatementInfo:
    return StatementInfo(Verdict(Target.REPLICA, Reason.TRANSACTION_CONTROL), text)


SESSION_HANDLERS: dict[str, Callable[[dict, str, ExpressionScan], StatementInfo]] = {
    "TransactionStmt": transaction,
    "VariableSetStmt": variable_set,
    "DiscardStmt": discard,
    "DeallocateStmt": deallocate,
    "ConstraintsSetStmt": constraints_set,
}


def router_target_primary(sql: str) -> StatementInfo | None:
    """The statement if ``sql`` is exactly ``SET [SESSION] pgrouter.target {= | TO} primary``.

    For a message the parser rejected: PRIMARY is a reserved word, so the grammar refuses it
    unquoted, while ``replica`` and ``auto`` parse. The session intercepts this statement, so
    it need not be valid SQL. Comments are not tokens, so they may surround it.
    """
    try:
        tokens = scan(sql)
    except (ParseError, ValueError):
        return None
    words = [sql[token.start : token.end + 1].lower() for token in tokens]
    while words and words[-1] == ";":
        words.pop()
    if words[1:2] == ["session"]:
        del words[1]
    if words[:4] != ["set", "pgrouter", ".", "target"] or words[4:] not in (
        ["=", "primary"],
        ["to", "primary"],
    ):
        return None
    text = sql[tokens[0].start : tokens[-1].end + 1].rstrip(";").rstrip()
    return _session(Kind.ROUTER_TARGET, text, ROUTER_TARGET_GUC, "primary")


def _control(kind: StatementKind, text: str, name: str | None = None) -> StatementInfo:
    return StatementInfo(Verdict(Target.REPLICA, Reason.TRANSACTION_CONTROL, kind), text, name)


def _session(
    kind: StatementKind,
    text: str,
    name: str | None = None,
    value: str | None = None,
    read_only: bool | None = None,
) -> StatementInfo:
    verdict = Verdict(Target.REPLICA, Reason.SESSION_SET, kind)
    return StatementInfo(verdict, text, name, value, read_only)


def _set_multi(name: str, args: list, text: str) -> StatementInfo:
    """SET TRANSACTION ..., SET TRANSACTION SNAPSHOT, SET SESSION CHARACTERISTICS AS ..."""
    if name == "transaction snapshot":
        return _control(Kind.SET_TRANSACTION, text)
    read_only, serializable = _transaction_modes(args)
    if name == "transaction":
        return _set_transaction(read_only, serializable, text)
    # SESSION CHARACTERISTICS: the defaults of later transactions. The read-only mode is the
    # one routing needs; with several modes in one statement, the session replays `text`.
    if read_only is not None:
        guc = "default_transaction_read_only"
        return _session(Kind.SET_DEFAULT_READ_ONLY, text, guc, None, read_only)
    first = args[0].get("DefElem", {}) if args else {}
    guc = "default_" + first.get("defname", "transaction_isolation")
    return _session(Kind.SET_SESSION, text, guc, _render_value([first.get("arg")]))


def _set_transaction(read_only: bool | None, serializable: bool, text: str) -> StatementInfo:
    if read_only is None:
        kind = Kind.SET_TRANSACTION
    else:
        kind = Kind.SET_TRANSACTION_READ_ONLY if read_only else Kind.SET_TRANSACTION_READ_WRITE
    if serializable:
        return StatementInfo(Verdict(Target.PRIMARY, Reason.SERIALIZABLE, kind), text)
    if read_only is False:
        verdict = Verdict(Target.PRIMARY, Reason.TRANSACTION_BEGIN_READ_WRITE, kind)
        return StatementInfo(verdict, text)
    reason = Reason.TRANSACTION_BEGIN_READ_ONLY if read_only else Reason.TRANSACTION_CONTROL
    return StatementInfo(Verdict(Target.REPLICA, reason, kind), text)


def _transaction_modes(options: list) -> tuple[bool | None, bool]:
    """(read only? None if unsaid, serializable?) from BEGIN / SET TRANSACTION options."""
    read_only = None
    serializable = False
    for option in options:
        elem = option.get("DefElem", {})
        name = elem.get("defname")
        if name == "transaction_read_only":
            read_only = integer_constant(elem.get("arg")) == 1
        elif name == "transaction_isolation":
            serializable = (string_constant(elem.get("arg")) or "").lower() == "serializable"
    return read_only, serializable


def _render_value(args: list) -> str | None:
    """A readable rendering of SET arguments: constants unquoted, joined with ", "."""
    parts = []
    for arg in args:
        while arg is not None and "TypeCast" in arg:
            arg = arg["TypeCast"].get("arg")
        const = arg.get("A_Const") if arg is not None else None
        if const is None:
            return None
        if "sval" in const:
            parts.append(const["sval"].get("sval", ""))
        elif "ival" in const:
            parts.append(str(const["ival"].get("ival", 0)))
        elif "fval" in const:
            parts.append(const["fval"].get("fval", "0"))
        elif "boolval" in const:
            parts.append("true" if const["boolval"].get("boolval") else "false")
        else:
            return None
    return ", ".join(parts) if parts else None
