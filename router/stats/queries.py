"""Query statistics per tenant and statement fingerprint, and the slow-query log. No I/O.

What is counted is one *call*: a simple Query message, or the extended-protocol messages up to
their Sync, timed from when the router sends the first of them to the server until the server's
ReadyForQuery for the last. Its statement is the Query's text, or the text the Parse (or the
named statement a Bind uses) carries; its rows are the sum of its CommandComplete row counts.

The hot path only appends a tuple to a list (``record``). Folding those into per-fingerprint
entries happens in batches, when the list is long or someone reads the statistics: a statement
text's fingerprint (pglast, libpg_query's fingerprint: constants and parameter numbers do not
change it) is cached by the text with its digits zeroed (router/sqlkey.py, one bytes.translate),
then by the text with its literals stripped (a regex pass, on a miss only), so
``pgbench -S -M simple`` (a new number every query) pays neither a parse nor a regex per query.

Memory is bounded: at most ``max_entries`` fingerprints are kept, the ones with the largest total
time. When the table grows a quarter past that, the rest are dropped (and counted as evicted).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pglast import parser

from router.sqlkey import TextCache

log = logging.getLogger("pgrouter.queries")

# Fold the pending calls once this many have piled up.
FOLD_AT = 2048
# Longest statement text kept (and logged) per fingerprint.
MAX_QUERY_CHARS = 2000
# Fingerprints of statement texts, cached by text (cleared when it grows past this).
MAX_FINGERPRINT_CACHE = 10_000

# Literals: quoted strings (with '' inside), E'' strings, numbers. Used only to share the
# fingerprint cache between texts that differ in literals; the fingerprint itself is pglast's.
# The lookahead lets the engine skip most positions at once (a third faster on pgbench's texts).
_LITERALS = re.compile(
    r"(?=[\d'eEbBxXnN])(?:(?:[eEbBxXnN])?'(?:[^']|'')*'|(?<![\w$])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b)"
)
# The same with double-quoted identifiers matched first and kept as they are: "col 1" and
# "col 2" are different columns, and a ' inside "it's" starts no string.
_LITERALS_OR_IDENTIFIERS = re.compile(r'("(?:[^"]|"")*")|' + _LITERALS.pattern)


def _shape(sql: str) -> str:
    """``sql`` with its literals replaced by ?: texts of one shape share a fingerprint."""
    if '"' not in sql:
        return _LITERALS.sub("?", sql)
    return _LITERALS_OR_IDENTIFIERS.sub(lambda match: match.group(1) or "?", sql)


@dataclass(slots=True)
class QueryStat:
    """What is known about one statement fingerprint of one tenant."""

    tenant: str
    fingerprint: str
    query: str  # the first text seen, with its constants replaced by $n (parameters redacted)
    calls: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0
    rows: int = 0
    errors: int = 0
    roles: dict[str, int] = field(default_factory=dict)  # calls per node role

    @property
    def mean_seconds(self) -> float:
        return self.total_seconds / self.calls if self.calls else 0.0

    def as_dict(self) -> dict:
        return {
            "tenant": self.tenant,
            "fingerprint": self.fingerprint,
            "query": self.query,
            "calls": self.calls,
            "total_ms": round(self.total_seconds * 1000, 3),
            "mean_ms": round(self.mean_seconds * 1000, 3),
            "max_ms": round(self.max_seconds * 1000, 3),
            "rows": self.rows,
            "errors": self.errors,
            "roles": dict(self.roles),
        }


def redact(sql: str) -> str:
    """The statement with its constants replaced by $1, $2, ... (libpg_query's normaliser);
    for text PostgreSQL's grammar rejects, literals are blanked by pattern instead."""
    try:
        text = parser.normalize(sql)
    except Exception:  # ParseError, or anything the C library reports: fall back to the pattern
        text = _shape(sql)
    text = " ".join(text.split())
    return text if len(text) <= MAX_QUERY_CHARS else text[: MAX_QUERY_CHARS - 1] + "…"


def fingerprint(sql: str) -> str:
    """libpg_query's fingerprint (16 hex digits); text it cannot parse gets a hash of its
    literal-stripped form, prefixed with ``x`` so the two kinds never collide."""
    try:
        return parser.fingerprint(sql)
    except Exception:  # ParseError: an unparsable statement still gets a stable identity
        stripped = " ".join(_shape(sql).split())
        return "x" + hashlib.blake2b(stripped.encode(), digest_size=8).hexdigest()


class FingerprintCache:
    """Fingerprints by statement text; texts that differ only in literals share one parse."""

    def __init__(self, limit: int = MAX_FINGERPRINT_CACHE) -> None:
        self.limit = limit
        self._by_text: dict[str, str] = {}
        self._by_shape: dict[str, str] = {}

    def __call__(self, sql: str) -> str:
        fp = self._by_text.get(sql)
        if fp is not None:
            return fp
        fp = self.by_shape(sql)
        if len(self._by_text) >= self.limit:
            self._by_text.clear()
        self._by_text[sql] = fp
        return fp

    def by_shape(self, sql: str) -> str:
        """The fingerprint through the literal-stripped cache only (callers that cache by
        text themselves)."""
        shape = _shape(sql)
        fp = self._by_shape.get(shape)
        if fp is None:
            fp = fingerprint(sql)
            if len(self._by_shape) >= self.limit:
                self._by_shape.clear()
            self._by_shape[shape] = fp
        return fp


# (tenant, statement text, seconds, rows, SQLSTATE or None, node role, node address)
Call = tuple[str, bytes, float, int, "str | None", str, str]


class QueryStats:
    def __init__(
        self,
        max_entries: int,
        slow_query_seconds: float | None = None,
        encoding: str = "utf-8",
        slow_log: Callable[[dict], None] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.slow_query_seconds = slow_query_seconds
        self.encoding = encoding
        self.entries: dict[tuple[str, str], QueryStat] = {}
        self.evicted = 0  # fingerprints dropped to keep the table bounded
        self.slow_queries = 0
        self._pending: list[Call] = []
        self._fingerprints = FingerprintCache()
        # Fingerprints of undecoded texts (router/sqlkey.py): a statement run again, or with
        # other numbers in it, skips decoding and the text cache.
        self._by_key: TextCache[str] = TextCache(MAX_FINGERPRINT_CACHE, shapes=True)
        self._slow_log = slow_log or _log_slow

    # --- hot path --------------------------------------------------------------------

    def record(
        self, tenant: str, sql: bytes, seconds: float, rows: int, sqlstate: str | None, role: str, node: str
    ) -> None:
        """One finished call. Cheap: folded later, in batches."""
        pending = self._pending
        pending.append((tenant, sql, seconds, rows, sqlstate, role, node))
        slow = self.slow_query_seconds
        if slow is not None and seconds >= slow:
            self._report_slow(pending[-1])
        if len(pending) >= FOLD_AT:
            self.fold()

    # --- reading -----------------------------------------------------------------------

    def fold(self) -> None:
        """Add the pending calls to their fingerprints' entries."""
        pending, self._pending = self._pending, []
        entries = self.entries
        fingerprint_of = self._fingerprints
        by_key = self._by_key
        for tenant, sql_bytes, seconds, rows, sqlstate, role, _node in pending:
            fp = by_key.get(sql_bytes)
            if fp is None:
                fp = fingerprint_of.by_shape(sql_bytes.decode(self.encoding, "replace"))
                by_key.put(sql_bytes, fp)
            key = (tenant, fp)
            entry = entries.get(key)
            if entry is None:
                sql = sql_bytes.decode(self.encoding, "replace")
                entry = entries[key] = QueryStat(tenant, fp, redact(sql))
            entry.calls += 1
            entry.total_seconds += seconds
            if seconds > entry.max_seconds:
                entry.max_seconds = seconds
            entry.rows += rows
            if sqlstate is not None:
                entry.errors += 1
            entry.roles[role] = entry.roles.get(role, 0) + 1
        if len(entries) > self.max_entries + self.max_entries // 4:
            self._prune()

    def _prune(self) -> None:
        keep = sorted(self.entries.values(), key=lambda e: e.total_seconds, reverse=True)[: self.max_entries]
        self.evicted += len(self.entries) - len(keep)
        self.entries = {(e.tenant, e.fingerprint): e for e in keep}

    def top(self, limit: int | None = None, tenant: str | None = None) -> list[QueryStat]:
        """Entries by total time, largest first (one tenant's, with ``tenant``)."""
        self.fold()
        if len(self.entries) > self.max_entries:
            self._prune()
        entries = self.entries.values()
        if tenant is not None:
            entries = [e for e in entries if e.tenant == tenant]
        ranked = sorted(entries, key=lambda e: e.total_seconds, reverse=True)
        return ranked if limit is None else ranked[:limit]

    def reset(self, tenant: str | None = None) -> None:
        self.fold()
        if tenant is None:
            self.entries.clear()
        else:
            self.entries = {k: e for k, e in self.entries.items() if e.tenant != tenant}

    # --- slow-query log -------------------------------------------------------------------

    def _report_slow(self, call: Call) -> None:
        tenant, sql_bytes, seconds, rows, sqlstate, role, node = call
        self.slow_queries += 1
        sql = sql_bytes.decode(self.encoding, "replace")
        self._slow_log(
            {
                "tenant": tenant,
                "fingerprint": self._fingerprints(sql),
                "duration_ms": round(seconds * 1000, 3),
                "node": node,
                "role": role,
                "rows": rows,
                "sqlstate": sqlstate,
                "query": redact(sql),
            }
        )


def _log_slow(event: dict) -> None:
    log.warning(
        "slow query: %.1f ms on %s (%s), tenant %s, fingerprint %s: %s",
        event["duration_ms"], event["node"], event["role"], event["tenant"] or "-",
        event["fingerprint"], event["query"],
        extra={"fields": {"event": "slow_query", **event}},
    )
