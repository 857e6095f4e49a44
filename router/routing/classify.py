"""Classify the SQL of a Query or Parse message: where may it run, what does it change.

``classify(sql, functions)`` is pure: the same text and catalog give the same
``Classification``, it never raises, it does no I/O. ``ClassifierCache`` in front of it is the
only state: a bounded LRU keyed by ``(sql, catalog)``, owned by whoever calls it.

Where the rules live: verdict.py (targets, reasons, kinds, combining statements), hints.py
(``/* pgrouter: ... */``), functions.py (which functions may run on a replica), statements.py
and session_statements.py (each statement type), expressions.py (what is found inside).

The parser is PostgreSQL's own (libpg_query through pglast, PostgreSQL 18 grammar), so
comments, dollar quoting, quoted identifiers and E'' strings are handled exactly as the server
handles them; nothing here looks for keywords in the text. Text it cannot parse (garbage, or
syntax newer than its grammar) goes to the primary (UNPARSABLE): PostgreSQL parses a whole
Query string before running any of it, so a message the server also rejects runs nowhere.

We read the parse tree as the JSON libpg_query produces (``pglast.parser.parse_sql_json``)
rather than as ``pglast.ast`` objects: pglast builds those through validating Python
``__setattr__`` calls, which cost 5x the parse itself (typical 300-character ORM SELECT:
~170 us for ``pglast.parse_sql``, ~30 us for ``parse_sql_json`` + ``json.loads``), and a miss
is paid for every distinct text, i.e. for every query of an application that inlines its
parameters. Measured here: a cache hit costs ~0.3 us, a miss 10-80 us for ordinary statements.

The fingerprint covers the whole text (all statements; comments and constants do not change
it). It costs ~10 us on a miss and is cached with the rest.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from pglast.parser import ParseError, fingerprint, parse_sql_json

from router.routing.expressions import ExpressionScan
from router.routing.functions import FunctionCatalog
from router.routing.hints import apply_hint, leading_hint
from router.routing.session_statements import router_target_primary
from router.routing.statements import classify_statement
from router.routing.verdict import (
    Classification,
    Reason,
    StatementInfo,
    Target,
    Verdict,
    combine,
)

# Entries kept by ClassifierCache. A classification is a few hundred bytes plus its text;
# 10 000 distinct statement texts cover the working set of most applications.
DEFAULT_CACHE_SIZE = 10_000
# Longer texts are classified but not cached: at this size they are bulk statements with
# inline data that never repeat, and one would push thousands of useful entries out.
DEFAULT_MAX_CACHED_SQL_LENGTH = 64 * 1024
# Bound on the characters of query text the cache holds, so that its memory is bounded
# whatever the texts (statement texts kept in the entries at most double it).
DEFAULT_MAX_CACHED_TOTAL_LENGTH = 16 * 1024 * 1024

_EMPTY_VERDICT = Verdict(Target.REPLICA, Reason.EMPTY)


def classify(sql: str, functions: FunctionCatalog) -> Classification:
    """Decide where the statements of one Query/Parse message may run. Pure; never raises."""
    hint = leading_hint(sql)
    try:
        if "\x00" in sql:
            # A protocol string ends at its first NUL; the C parser would see only a prefix.
            raise ValueError("NUL in query text")
        tree_json = parse_sql_json(sql)
        tree = json.loads(tree_json)
    except (ParseError, ValueError, RecursionError):
        # ValueError also covers UnicodeEncodeError (lone surrogates).
        return _unparsable(sql, hint)

    raw_statements = tree.get("stmts", ())
    if not raw_statements:
        return Classification(_EMPTY_VERDICT, (), hint)
    encoded = None if sql.isascii() else sql.encode()
    expressions = ExpressionScan(functions, tree_json)
    statements = []
    for raw in raw_statements:
        # libpg_query omits fields equal to 0: the first statement's location, the last's
        # length (meaning "to the end of the text").
        text = _statement_text(sql, encoded, raw.get("stmt_location", 0), raw.get("stmt_len", 0))
        try:
            info = classify_statement(raw["stmt"], text, expressions)
        except (KeyError, TypeError, AttributeError, ValueError):
            # A tree shape this module does not expect (a newer libpg_query): the safe
            # target, never an exception on the data path.
            info = StatementInfo(Verdict(Target.PRIMARY, Reason.UNKNOWN), text)
        statements.append(info if hint is None else _hinted(info, hint))
    infos = tuple(statements)
    try:
        print_ = fingerprint(sql)
    except ParseError:  # not expected once the text parsed; the fingerprint is only statistics
        print_ = None
    return Classification(
        verdict=combine(infos),
        statements=infos,
        hint=hint,
        set_config_calls=expressions.calls_in_order(),
        fingerprint=print_,
        pin_calls=expressions.pins_in_order(),
    )


class ClassifierCache:
    """Bounded LRU of classifications keyed by ``(sql, catalog)``.

    The catalog is part of the key by identity (catalogs are immutable; a reload is a new
    object), so one cache can serve databases with different catalogs, and entries made with
    an old catalog are never returned for a new one; they age out. ``hits`` and ``misses``
    count lookups, for metrics.
    """

    def __init__(
        self,
        maxsize: int = DEFAULT_CACHE_SIZE,
        max_sql_length: int = DEFAULT_MAX_CACHED_SQL_LENGTH,
        max_total_length: int = DEFAULT_MAX_CACHED_TOTAL_LENGTH,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.max_sql_length = max_sql_length
        self.max_total_length = max_total_length
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, FunctionCatalog], Classification] = OrderedDict()
        self._total_length = 0

    def classify(self, sql: str, functions: FunctionCatalog) -> Classification:
        key = (sql, functions)
        entries = self._entries
        found = entries.get(key)
        if found is not None:
            entries.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        result = classify(sql, functions)
        if len(sql) <= self.max_sql_length:
            entries[key] = result
            self._total_length += len(sql)
            while len(entries) > self.maxsize or self._total_length > self.max_total_length:
                (old_sql, _), _ = entries.popitem(last=False)
                self._total_length -= len(old_sql)
        return result

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self._total_length = 0


def _unparsable(sql: str, hint: Target | None) -> Classification:
    info = router_target_primary(sql)
    if info is None:
        info = StatementInfo(Verdict(Target.PRIMARY, Reason.UNPARSABLE), sql.strip())
    if hint is not None:
        info = _hinted(info, hint)
    return Classification(info.verdict, (info,), hint)


def _hinted(info: StatementInfo, hint: Target) -> StatementInfo:
    verdict = apply_hint(info.verdict, hint)
    return StatementInfo(verdict, info.text, info.name, info.value, info.read_only)


def _statement_text(sql: str, encoded: bytes | None, location: int, length: int) -> str:
    """The statement at UTF-8 byte offset ``location``, ``length`` bytes long (0: to the end)."""
    if encoded is None:  # ASCII: bytes and characters coincide
        text = sql[location : location + length] if length else sql[location:]
    else:
        chunk = encoded[location : location + length] if length else encoded[location:]
        text = chunk.decode(errors="replace")
    return text.rstrip()
