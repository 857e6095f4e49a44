"""Statements that change transaction or session state: what the session layer must track.

Transaction control (BEGIN, COMMIT, SAVEPOINT, SET TRANSACTION...), session parameters (SET,
RESET, DISCARD, DEALLOCATE) and the router's own ``pgrouter.target``. Their targets:

* BEGIN / START TRANSACTION: PRIMARY (TRANSACTION_BEGIN_READ_WRITE) unless READ ONLY, then
  REPLICA (TRANSACTION_BEGIN_READ_ONLY). A plain BEGIN's transaction is read-only in a session
  with ``default_transaction_read_only`` on, which the session knows (a suspected write); one
  that says READ WRITE, as SET TRANSACTION READ WRITE does, is read-write whatever the session
  (TRANSACTION_READ_WRITE, the primary: a hot standby refuses it). The options are read from
  the parse tree (``transaction_read_only``), never from the text.
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
from dataclasses import dataclass

from pglast.parser import ParseError, scan

from router.routing.expressions import ExpressionScan, integer_constant, parse_bool, string_constant
from router.routing.verdict import (
    ROUTER_TARGET_GUC,
    ROUTER_TARGET_VALUES,
    Reason,
    StatementInfo,
    StatementKind,
    Target,
    Verdict,
)

Kind = StatementKind


_SAVEPOINT_ACTIONS = {
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback_to",
}


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
        reason = Reason.TRANSACTION_BEGIN_READ_WRITE if read_only is None else Reason.TRANSACTION_READ_WRITE
        return StatementInfo(Verdict(Target.PRIMARY, reason, Kind.BEGIN), text)
    chain = bool(body.get("chain"))
    if kind == "TRANS_STMT_COMMIT":
        return _control(Kind.COMMIT_AND_CHAIN if chain else Kind.COMMIT, text)
    if kind == "TRANS_STMT_ROLLBACK":
        return _control(Kind.ROLLBACK_AND_CHAIN if chain else Kind.ROLLBACK, text)
    if kind in _SAVEPOINT_ACTIONS:
        info = _control(Kind.SAVEPOINT, text, body.get("savepoint_name"))
        return StatementInfo(info.verdict, text, info.name, _SAVEPOINT_ACTIONS[kind])
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


@dataclass(frozen=True, slots=True)
class RouterTargetSet:
    """A ``SET [SESSION] pgrouter.target`` or ``RESET pgrouter.target`` found in a text:
    where it is (``sql[start:end]``, without the semicolon) and the value it asks for
    (``auto`` for DEFAULT or RESET), lowercased, or as written when it is not one word."""

    start: int
    end: int
    value: str
    reset: bool  # RESET (its command tag is RESET, not SET)


_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})


def router_target_sets(sql: str) -> list[RouterTargetSet]:
    """Every statement of ``sql`` that sets or resets ``pgrouter.target``, from PostgreSQL's
    own tokens, so it is found where the grammar would refuse the text (``= primary``: PRIMARY
    is a reserved word) and never inside a string, a comment or a dollar-quoted body. An
    empty list when there is none or the text does not scan (an unterminated string)."""
    found = []
    for statement in _statement_tokens(sql):
        value = _router_target_value(sql, statement)
        if value is not None:
            reset = statement[0].name == "RESET"
            found.append(RouterTargetSet(statement[0].start, statement[-1].end + 1, value, reset))
    return found


def _statement_tokens(sql: str) -> list[list]:
    """The tokens of each statement of ``sql`` (comments left out), or none if it does not
    scan."""
    try:
        tokens = scan(sql)
    except (ParseError, ValueError):
        return []
    statements: list[list] = [[]]
    for token in tokens:
        if token.name == "ASCII_59":  # ';'
            statements.append([])
        elif token.name not in _COMMENTS:
            statements[-1].append(token)
    return [statement for statement in statements if statement]


def _router_target_value(sql: str, tokens: list) -> str | None:
    words = [_word(sql, token) for token in tokens]
    if words[:1] == ["reset"]:
        return "auto" if words[1:] == ["pgrouter", ".", "target"] else None
    if words[1:2] == ["session"]:
        del words[1]
        tokens = tokens[:1] + tokens[2:]
    if words[:4] != ["set", "pgrouter", ".", "target"] or words[4:5] not in (["="], ["to"]) or len(words) < 6:
        return None
    if len(words) == 6 and (tokens[5].kind != "NO_KEYWORD" or tokens[5].name in ("IDENT", "SCONST")):
        return "auto" if tokens[5].name == "DEFAULT" else words[5]
    return sql[tokens[5].start : tokens[-1].end + 1]


def _word(sql: str, token) -> str:
    """A token as PostgreSQL reads it for a setting's name or value: quotes off, lowercased
    (setting names are case-insensitive, and so are the router's values)."""
    text = sql[token.start : token.end + 1]
    if token.name == "SCONST" and text[:1] == "'":
        text = text[1:-1].replace("''", "'")
    elif token.name == "IDENT" and text[:1] == '"':
        text = text[1:-1].replace('""', '"')
    return text.lower()


# What a server gets in place of SET / RESET pgrouter.target: the same command tag, the
# placeholder setting left at its default, nothing else.
ROUTER_TARGET_ON_SERVER = "SET pgrouter.target TO DEFAULT"
ROUTER_TARGET_RESET_ON_SERVER = "RESET pgrouter.target"


@dataclass(frozen=True, slots=True)
class RouterTargetsOnServer:
    """What goes to a server instead of a text that sets pgrouter.target (never sent as
    written: ``= primary`` is a syntax error there, PRIMARY being a reserved word)."""

    sql: str  # each such statement replaced by the placeholder, or by the refusal
    runs: str  # the part the server runs before any refusal: what the session tracks
    values: tuple[str, ...]  # the valid values set, in order (what the placeholders stand for)
    lone: bool  # the text is that one statement and nothing else


def router_targets_for_server(
    sql: str, refusal: Callable[[str], str], keep_values: bool = False
) -> RouterTargetsOnServer | None:
    """Each statement of ``sql`` that sets pgrouter.target becomes the placeholder, which
    PostgreSQL answers as it would the SET. One with a value other than primary, replica or
    auto becomes ``refusal(value)`` (a statement that fails), and what follows it is left out:
    PostgreSQL runs nothing of a Query after its first error. None when ``sql`` sets no
    pgrouter.target.

    ``keep_values`` (session pooling, where the client keeps its server connection): a SET
    becomes ``SET pgrouter.target TO 'value'`` with its valid value spelt as the router does,
    so the server holds the session's value, undone by a rollback as any setting, and
    answers SHOW pgrouter.target with it."""
    found = router_target_sets(sql)
    if not found:
        return None
    pieces: list[str] = []
    values: list[str] = []
    last = 0
    runs = None
    for target in found:
        pieces.append(sql[last : target.start])
        if target.value not in ROUTER_TARGET_VALUES:
            runs = "".join(pieces)
            pieces.append(refusal(target.value))
            break
        if target.reset:
            pieces.append(ROUTER_TARGET_RESET_ON_SERVER)
        elif keep_values:
            pieces.append(f"SET {ROUTER_TARGET_GUC} TO '{target.value}'")
        else:
            pieces.append(ROUTER_TARGET_ON_SERVER)
        values.append(target.value)
        last = target.end
    else:
        pieces.append(sql[last:])
    text = "".join(pieces)
    lone = len(found) == 1 and not sql[: found[0].start].strip() and not sql[found[0].end :].strip(" \t\n\r\f;")
    return RouterTargetsOnServer(text, text if runs is None else runs, tuple(values), lone)


def router_target_primary(sql: str) -> StatementInfo | None:
    """The statement if ``sql`` is exactly ``SET [SESSION] pgrouter.target {= | TO} primary``.

    For a message the parser rejected: PRIMARY is a reserved word, so the grammar refuses it
    unquoted, while ``replica`` and ``auto`` parse. The session intercepts this statement, so
    it need not be valid SQL. Comments are not tokens, so they may surround it.
    """
    statements = _statement_tokens(sql)
    if len(statements) != 1 or _router_target_value(sql, statements[0]) != "primary":
        return None
    text = sql[statements[0][0].start : statements[0][-1].end + 1]
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
        verdict = Verdict(Target.PRIMARY, Reason.TRANSACTION_READ_WRITE, kind)
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
