"""What hides inside a statement: function calls, locking clauses, nested writes.

``ExpressionScan`` walks a parse tree in libpg_query's JSON form (a node is
``{"TypeName": {fields}}``; fields equal to their default are omitted) and reports the
strongest reason it finds for a would-be read to need the primary. It walks every part of the
tree (select list, WHERE, ORDER BY, FROM function scans, subqueries, CTEs, VALUES...), so
nothing depends on where a function is written. On the way it collects the setting names of
set_config() calls, which the tenant-isolation code must see wherever they are.

Also here: small accessors for constants in that JSON, shared with statements.py.
"""

from __future__ import annotations

from collections.abc import Iterator

from router.routing.functions import CATALOG_SCHEMA, FunctionCatalog
from router.routing.verdict import Reason

DML_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})

# Strongest first: what a scan reports when it finds several things. Definite writes come
# before the suspicions a replica hint may override (verdict.SUSPECTED_WRITE_REASONS).
FINDING_ORDER = (
    Reason.WRITABLE_CTE,
    Reason.LOCKING_CLAUSE,
    Reason.NEXTVAL,
    Reason.ADVISORY_LOCK,
    Reason.SET_CONFIG,
    Reason.LISTEN_NOTIFY,
    Reason.WRITER_FUNCTION,
    Reason.VOLATILE_FUNCTION,
    Reason.UNKNOWN_FUNCTION,
)
_FINDING_RANK = {reason: rank for rank, reason in enumerate(FINDING_ORDER)}

# Node types the scan reports; a FuncCall's reason depends on the catalog. A data-modifying
# statement below the top of a statement can only be a writable CTE.
_MARKERS: dict[str, Reason | None] = {
    "FuncCall": None,
    "LockingClause": Reason.LOCKING_CLAUSE,
    **dict.fromkeys(DML_NODES, Reason.WRITABLE_CTE),
}
_MARKER_KEYS = tuple(f'"{key}":' for key in _MARKERS)
# Node types that cannot contain a marker: the scan does not descend into them (speed only).
_LEAF_NODES = frozenset(
    {
        "ColumnRef",
        "A_Const",
        "ParamRef",
        "String",
        "Integer",
        "Float",
        "Boolean",
        "BitString",
        "A_Star",
        "RangeVar",
        "TypeName",
    }
)


# Session-level advisory locks: taking one (even a failed try) pins a transaction-mode client to
# its server connection, pg_advisory_unlock_all() unpins (frontend/client.py, _track_pins).
PIN_FUNCTIONS = frozenset(
    {
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_unlock_all",
    }
)


class ExpressionScan:
    """Scans the statements of one message; accumulates the set_config() and session
    advisory-lock calls it meets, and which calls certainly run once (note_select).

    ``active`` is False when the message's JSON text holds none of the node types the scan
    looks for: then there is nothing to find and ``strongest_finding`` returns at once (most
    ORM reads and writes). A SQL string constant cannot fake a node key: the JSON escapes its
    quotes, so the check has no false negatives, and a false positive would only cost a walk.
    """

    __slots__ = ("functions", "active", "set_config_calls", "pin_calls", "runs_once")

    def __init__(self, functions: FunctionCatalog, tree_json: str) -> None:
        self.functions = functions
        self.active = any(marker in tree_json for marker in _MARKER_KEYS)
        # (position in the text, (lowercased name, value, is_local)) per call; None where the
        # argument is not a constant. The walk is depth-first: sort by position for the order
        # PostgreSQL runs them in (calls_in_order).
        self.set_config_calls: list[tuple[int, tuple[str | None, str | None, bool | None]]] = []
        # (position, lowercased name) of calls of the session advisory-lock functions, which
        # pin a transaction-mode client (PIN_FUNCTIONS): found here by name however it is
        # spelt (U&"pg_advisory\005flock"), where the client's text pattern sees only words.
        self.pin_calls: list[tuple[int, str]] = []
        # Positions of the calls that certainly run exactly once (note_select): a set_config()
        # elsewhere (WHERE, FROM, CASE, an UPDATE) may run any number of times, none included,
        # so the value it leaves is not known from the text.
        self.runs_once: set[int] = set()

    def note_select(self, select: dict) -> None:
        """A top-level SELECT (or the one EXPLAIN ANALYZE runs): note the calls it runs once."""
        self.runs_once.update(_calls_run_once(select))

    def calls_in_order(self) -> tuple[tuple[str | None, str | None, bool | None], ...]:
        """The set_config() calls met so far, in the order of the text."""
        return tuple(call for _, call in sorted(self.set_config_calls, key=lambda item: item[0]))

    def pins_in_order(self) -> tuple[str, ...]:
        """The PIN_FUNCTIONS calls met so far, in the order of the text."""
        return tuple(name for _, name in sorted(self.pin_calls))

    def strongest_finding(self, tree: object) -> Reason | None:
        """The strongest reason found anywhere in ``tree`` to need the primary, if any."""
        if not self.active:
            return None
        best: Reason | None = None
        best_rank = len(FINDING_ORDER)
        stack = [tree]
        pop, push = stack.pop, stack.append
        while stack:  # iterative: a deeply nested tree must not exhaust the Python stack
            item = pop()
            if type(item) is list:
                for element in item:
                    if type(element) is dict or type(element) is list:
                        push(element)
                continue
            for key, value in item.items():
                value_type = type(value)
                if value_type is dict:
                    if key in _MARKERS:
                        reason = self._function_call(value) if key == "FuncCall" else _MARKERS[key]
                        if reason is not None and _FINDING_RANK[reason] < best_rank:
                            best, best_rank = reason, _FINDING_RANK[reason]
                    elif key in _LEAF_NODES:
                        continue
                    push(value)
                elif value_type is list:
                    push(value)
        return best

    def _function_call(self, call: dict) -> Reason | None:
        parts = [string_value(part) for part in call.get("funcname", ())]
        name = parts[-1] if parts else ""
        schema = parts[-2] if len(parts) > 1 else None  # database.schema.f(): schema
        lowered = name.lower()
        if schema is None or schema.lower() == CATALOG_SCHEMA:
            if lowered == "set_config":
                self._note_set_config(call.get("args", ()), call.get("location", 0))
            elif lowered in PIN_FUNCTIONS:
                self.pin_calls.append((call.get("location", 0), lowered))
        return self.functions.check(name, schema)

    def _note_set_config(self, args: list, location: int) -> None:
        # set_config(setting_name, new_value, is_local). Named arguments are taken too,
        # though PostgreSQL's set_config (no argument names in pg_proc) rejects them.
        values: dict[str, dict | None] = dict.fromkeys(_SET_CONFIG_ARGS)
        for position, arg in enumerate(args):
            named = arg.get("NamedArgExpr")
            if named is not None:
                if named.get("name") in values:
                    values[named["name"]] = named.get("arg")
            elif position < len(_SET_CONFIG_ARGS):
                values[_SET_CONFIG_ARGS[position]] = arg
        name = string_constant(values["setting_name"])
        call = (
            name.lower() if name is not None else None,
            string_constant(values["new_value"]) if location in self.runs_once else None,
            bool_constant(values["is_local"]),
        )
        self.set_config_calls.append((location, call))


_SET_CONFIG_ARGS = ("setting_name", "new_value", "is_local")


# A SELECT with any of these runs its target list once per row, maybe never.
_PER_ROW_CLAUSES = ("fromClause", "whereClause", "groupClause", "havingClause", "limitCount", "limitOffset", "valuesLists")


def _calls_run_once(select: dict) -> Iterator[int]:
    """Locations of the function calls a SelectStmt certainly runs exactly once: the targets
    of a SELECT without FROM, WHERE, GROUP BY, HAVING, LIMIT or OFFSET that are a call, or a
    scalar subquery of that kind (whose targets count the same way)."""
    if any(select.get(clause) for clause in _PER_ROW_CLAUSES) or select.get("op", "SETOP_NONE") != "SETOP_NONE":
        return
    for target in select.get("targetList", ()):
        value = (target.get("ResTarget") or {}).get("val") or {}
        call = value.get("FuncCall")
        if call is not None:
            yield call.get("location", 0)
            continue
        link = value.get("SubLink")
        if link is not None and link.get("subLinkType") == "EXPR_SUBLINK":
            inner = (link.get("subselect") or {}).get("SelectStmt")
            if inner is not None:
                yield from _calls_run_once(inner)


def bool_constant(node: dict | None) -> bool | None:
    """The value of a boolean constant (true, false, 'off'::bool, ...); None otherwise."""
    const = node.get("A_Const") if node is not None else None
    if const is not None and "boolval" in const:
        return bool(const["boolval"].get("boolval", False))  # false is stored as {}
    text = string_constant(node)
    return parse_bool(text) if text is not None else None


def parse_bool(value: str) -> bool | None:
    """PostgreSQL's parse_bool (utils/adt/bool.c): true/false/yes/no/on/off/1/0, and unique
    prefixes of the words; None when invalid."""
    text = value.lower()
    if not text:
        return None
    if "true".startswith(text) or "yes".startswith(text):
        return True
    if "false".startswith(text) or "no".startswith(text):
        return False
    if text == "on":
        return True
    if len(text) >= 2 and "off".startswith(text):  # "o" alone is ambiguous
        return False
    if text == "1":
        return True
    if text == "0":
        return False
    return None


def string_value(node: dict) -> str:
    """The text of a ``String`` node (identifiers, names)."""
    return node.get("String", {}).get("sval", "")


def string_constant(node: dict | None) -> str | None:
    """The value of a string constant, looking through casts ('x'::text); None otherwise."""
    while node is not None and "TypeCast" in node:
        node = node["TypeCast"].get("arg")
    if node is None:
        return None
    sval = node.get("A_Const", {}).get("sval")
    return sval.get("sval", "") if sval is not None else None


def integer_constant(node: dict | None) -> int | None:
    """The value of an integer constant (0 is written as an empty object); None otherwise."""
    if node is None:
        return None
    ival = node.get("A_Const", {}).get("ival")
    return ival.get("ival", 0) if ival is not None else None
