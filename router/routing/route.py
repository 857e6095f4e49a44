"""Which kind of node runs a client's next transaction, from the messages that open it.

Pure: the frontend hands over the bytes it holds and the client's session facts; this module
finds the SQL in them (Query and Parse messages, and the statements Bind names), asks the
classifier (cached, see ``VerdictCache``) and applies the session rules. Picking the node
itself (which replica, lag, fallbacks) is the cluster's business: router/splitting.py.

The rules, in order (README, "Read/write splitting"):

1. ``SET pgrouter.target = primary`` for the session: the primary.
2. The strongest verdict of every statement in the held messages (several pipelined queries
   run on one server connection, so one write among them sends all to the primary). PRIMARY
   wins unless it is only a *suspected* write (volatile or unknown function, CALL/DO, BEGIN
   without READ ONLY...) and the session asked for replicas (``SET pgrouter.target =
   replica``) or made its transactions read-only (``default_transaction_read_only = on``),
   where a real write fails anyway.
3. BEGIN READ ONLY / START TRANSACTION READ ONLY / SET TRANSACTION READ ONLY: a replica.
4. Everything else that is replica-compatible: a replica.

Extended-protocol messages up to a Sync are one implicit transaction, and a pipeline (psycopg,
libpq) sends them as they come, the Sync last: a read may open it and a write follow. So a
segment whose Sync has not come (``open_segment``) is routed once the Sync comes, or a Flush
asks for replies; a segment that asked for replies of an Execute before its Sync (it may go
on with a write after that round trip), or follows another segment in the held messages, runs
on the primary. A Parse and Describe flushed before their Execute (asyncpg) stay readable.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from enum import StrEnum

from router.routing.verdict import (
    SUSPECTED_WRITE_REASONS,
    Classification,
    Reason,
    StatementKind,
    Target,
    Verdict,
)
from router.sqlkey import TextCache

_unpack_len = struct.Struct("!I").unpack_from
_Q, _P, _B, _S = ord("Q"), ord("P"), ord("B"), ord("S")
# A chunk's flags carry, from this bit up, where the router put its own Query (the restore of
# startup settings after a RESET): bit RESTORE_SHIFT + k when it follows the chunk's k-th
# Query or Sync. Its SQL is the router's, not the client's, and decides nothing here.
RESTORE_SHIFT = 5
_D, _E = ord("D"), ord("E")
_F, _H = ord("F"), ord("H")
_SYNC = b"S\x00\x00\x00\x04"
_FLUSH = b"H\x00\x00\x00\x04"
# open_segment's flags.
AFTER_SYNC = 1  # a Sync, Query or FunctionCall comes before the open segment
EXECUTES = 2  # the open segment has an Execute
FLUSHES = 4  # the open segment has a Flush: its client may wait for replies before its Sync
BINDS = 8  # the open segment has a Bind: a portal lives on its server connection


class RouteReason(StrEnum):
    """Why a transaction went where it did. Stable values: they label metrics."""

    READ = "read"
    WRITE = "write"  # the statement writes, may write, or needs the primary
    HINT = "hint"  # a /* pgrouter: ... */ comment
    SESSION_TARGET = "session_target"  # SET pgrouter.target
    READ_ONLY = "read_only"  # a read-only transaction or session
    PINNED = "pinned"  # session state that lives on one backend: the primary
    LAG_FALLBACK = "lag_fallback"  # replicas up but all too far behind
    NODE_DOWN_FALLBACK = "node_down_fallback"  # no replica answering
    READ_YOUR_WRITES = "read_your_writes"  # no replica has replayed the session's last write


# A single SELECT that cannot need the primary, recognised without parsing: no parentheses
# (so no function call, subquery or CTE), no quotes or comments (which could hide anything,
# including hints), no FOR (locking clauses) or INTO, one statement. Applications that inline
# their parameters send a new text each time (pgbench -S: `SELECT abalance FROM
# pgbench_accounts WHERE aid = 4711;`), which would miss every cache; this spares them the
# parser. tests/unit/test_route.py checks that the parser agrees on every such text.
# Measured here: ~1 us, against 30-80 us for a parse (and the fingerprint) on a miss.
_PLAIN_SELECT = re.compile(rb"(?i)\s*select\s[^;()'\"$/\\\-]*;?\s*\Z")
_FOR_OR_INTO = re.compile(rb"(?i)\b(?:for|into)\b")
# A statement that starts with one of these words writes, whatever follows (a leading comment,
# which could be a hint, does not match).
_PLAIN_WRITE = re.compile(rb"(?i)\s*(?:insert|update|delete|merge)\s")
_EXPLAIN = re.compile(rb"(?i)\bexplain\b")
_READ = PLAIN_READ = Verdict(Target.REPLICA, Reason.READ)  # what a plain SELECT gets, unparsed
_WRITE = Verdict(Target.PRIMARY, Reason.WRITE)
_REFUSED = Verdict(Target.PRIMARY, Reason.REFUSED_BY_REPLICA)
# A FunctionCall message names its function by OID, unlooked-up: the large-object API
# (lo_creat, lo_write...) is most of what uses it, and writes.
_FUNCTION_CALL = Verdict(Target.PRIMARY, Reason.UNKNOWN_FUNCTION)


def _constants_may_matter(sql: bytes, classification: Classification) -> bool:
    """Whether the verdict of ``sql`` could change with the value of a constant in it, so that
    it may not be shared with texts that differ in constants: EXPLAIN (ANALYZE 0) runs nothing,
    (ANALYZE 1) runs its statement; SET transaction_read_only = 0 or 1; and, to be safe, every
    statement that is not a plain one (transaction control, settings)."""
    return any(info.verdict.kind is not StatementKind.PLAIN for info in classification.statements) or (
        _EXPLAIN.search(sql) is not None
    )


class VerdictCache:
    """Verdicts of Query/Parse texts as bytes, for one function catalog.

    In front of the classifier's own LRU (keyed by decoded text): a hit here skips the decode.
    A ``TextCache`` (router/sqlkey.py): texts that differ only in constants share an entry,
    unless a constant may change the verdict (``_constants_may_matter``).
    FIFO-bounded; a catalog change (``reset``) starts it afresh, but for the reads replicas
    refused as writes (``refused_by_replica``).
    """

    def __init__(
        self,
        classify: Callable[[str], Classification],
        maxsize: int = 10_000,
        max_text: int = 4096,
        encoding: str = "utf-8",
    ) -> None:
        self._classify = classify
        self._entries: TextCache[Verdict] = TextCache(maxsize, shapes=True)
        # Reads a replica refused as writes (refused_by_replica): what no classifier can see,
        # so kept when a catalog change (reset) forgets the rest.
        self._refused: TextCache[Verdict] = TextCache(maxsize, shapes=True)
        self.maxsize = maxsize
        self.max_text = max_text
        self.encoding = encoding

    def verdict(self, sql: bytes) -> Verdict:
        entries = self._entries
        found = entries.get(sql)
        if found is not None:
            return found
        if _PLAIN_SELECT.match(sql):
            verdict = _READ if _FOR_OR_INTO.search(sql) is None else None
        elif _PLAIN_WRITE.match(sql):
            verdict = _WRITE
        else:
            verdict = None
        exact = False
        if verdict is None:
            try:
                text = sql.decode(self.encoding)
            except UnicodeDecodeError:
                return Verdict(Target.PRIMARY, Reason.UNPARSABLE)
            classification = self._classify(text)
            verdict = classification.verdict
            if verdict == _READ:
                verdict = _READ  # one object: callers test ``is PLAIN_READ`` for the fast route
            exact = _constants_may_matter(sql, classification)
        if verdict is _READ and self._refused and self._refused.get(sql) is not None:
            verdict = _REFUSED
        if len(sql) <= self.max_text:
            entries.put(sql, verdict, exact=exact)
        return verdict

    def refused_by_replica(self, sql: bytes) -> bool:
        """A replica refused ``sql`` as a write (25006) that its verdict sent there as a read:
        from now on it (and texts that share its entry) goes to the primary. A hinted text
        keeps its hint. Returns whether the verdict changed."""
        if self.verdict(sql) is not _READ:
            return False
        refused = self._refused
        refused.put(sql, _REFUSED, exact=True)
        refused.put(sql, _REFUSED)
        # Texts of its shape judged before (under other keys: more digits, say) find the
        # refusal once they are judged again: start the verdicts afresh. Rare, so cheap.
        self.reset()
        return True

    def classification(self, sql: bytes) -> Classification | None:
        """The full classification (slow path: interceptions), None if undecodable."""
        try:
            return self._classify(sql.decode(self.encoding))
        except UnicodeDecodeError:
            return None

    def reset(self) -> None:
        self._entries = TextCache(self.maxsize, shapes=True)

    def __len__(self) -> int:
        return len(self._entries)


def lone_statement_sql(data: bytes) -> bytes | None:
    """The SQL of a chunk that runs one statement and nothing else, the commonest
    transaction: a whole Query message, or exactly Parse, Bind, [Describe,] Execute, Sync, all
    unnamed (pgbench -M extended, psycopg). None for anything else (the caller scans it)."""
    try:
        n = len(data)
        end = 1 + _unpack_len(data, 1)[0]
        t = data[0]
        if t == _Q:
            return data[5 : end - 1] if end == n else None
        if t != _P or data[5] != 0:
            return None
        sql_end = data.index(b"\0", 6, end)
        pos = end
        if data[pos] != _B or data[pos + 5] != 0 or data[pos + 6] != 0:  # portal, statement
            return None
        pos += 1 + _unpack_len(data, pos + 1)[0]
        if data[pos] == _D:
            if data[pos + 6] != 0:  # a named portal or statement
                return None
            pos += 1 + _unpack_len(data, pos + 1)[0]
        if data[pos] != _E or data[pos + 5] != 0:
            return None
        pos += 1 + _unpack_len(data, pos + 1)[0]
        if pos + 5 != n or data[pos:] != _SYNC:
            return None
        return data[6:sql_end]
    except (IndexError, ValueError, struct.error):  # truncated: not this shape
        return None


def held_verdict(
    chunks: list[tuple[bytes, int, int, int]],
    verdict_of: Callable[[bytes], Verdict],
    statement_sql: Callable[[bytes], bytes | None],
    last_unnamed: Verdict | None,
) -> tuple[Verdict | None, Verdict | None, Verdict | None]:
    """Scan held chunks ``(data, start, ...)`` for the SQL they run.

    Returns ``(first, combined, last_unnamed)``: the verdict of the first statement-bearing
    message (it tells BEGIN READ ONLY apart), the strongest verdict of all of them (None if no
    message carries SQL, e.g. a lone Sync), and the verdict of the last unnamed Parse, which a
    later unnamed Bind in another chunk runs.
    """
    first = combined = None
    for data, start, _syncs, flags in chunks:
        pos, n = start, len(data)
        restores = flags >> RESTORE_SHIFT
        synced = 0  # Queries and Syncs so far
        while pos + 5 <= n:
            t = data[pos]
            end = pos + 1 + _unpack_len(data, pos + 1)[0]
            if end > n:
                break
            verdict = None
            if t == _Q:
                if not (restores >> synced) & 1:
                    verdict = verdict_of(data[pos + 5 : end - 1])
                synced += 1
            elif t == _S:
                synced += 1
            elif t == _F:
                verdict = _FUNCTION_CALL
                synced += 1
            elif t == _P:
                name_end = data.index(b"\0", pos + 5, end)
                query_end = data.index(b"\0", name_end + 1, end)
                verdict = verdict_of(data[name_end + 1 : query_end])
                if name_end == pos + 5:
                    last_unnamed = verdict
            elif t == _B:
                portal_end = data.index(b"\0", pos + 5, end)
                name_end = data.index(b"\0", portal_end + 1, end)
                if name_end == portal_end + 1:
                    verdict = last_unnamed
                else:
                    sql = statement_sql(data[portal_end + 1 : name_end])
                    verdict = verdict_of(sql) if sql is not None else None
            if verdict is not None:
                if first is None:
                    first = combined = verdict
                elif verdict.target is Target.PRIMARY and combined.target is not Target.PRIMARY:
                    combined = verdict
            pos = end
    return first, combined, last_unnamed


def open_segment(chunks: list[tuple[bytes, int, int, int]]) -> int:
    """What held chunks ``(data, start, ...)`` that end before a Sync show of the messages
    after their last sync point (the open segment, one implicit transaction so far): the
    flags AFTER_SYNC, EXECUTES, BINDS and FLUSHES."""
    flags = 0
    for data, start, _syncs, _flags in chunks:
        pos, n = start, len(data)
        while pos + 5 <= n:
            t = data[pos]
            if t == _S or t == _Q or t == _F:
                flags = AFTER_SYNC
            elif t == _E:
                flags |= EXECUTES
            elif t == _B:
                flags |= BINDS
            elif t == _H:
                flags |= FLUSHES
            pos += 1 + _unpack_len(data, pos + 1)[0]
    return flags


def named_prepare(chunks: list[tuple[bytes, int, int, int]]) -> bool:
    """Whether held chunks ``(data, start, ...)`` are exactly one statement prepared and
    described, then flushed: Parse of a named statement, Describe of it, Flush (asyncpg's
    prepare). Such a segment changes nothing but that statement, which the router prepares
    on any server connection a Bind of it meets, so what follows it may run elsewhere."""
    if len(chunks) != 1:
        return False
    data, start, _syncs, _flags = chunks[0]
    try:
        end = 1 + _unpack_len(data, 1)[0]
        if start != 0 or data[0] != _P or data[5] == 0:
            return False
        name = data[5 : data.index(b"\0", 5, end) + 1]
        if data[end] != _D or data[end + 5] != _S or data[end + 6 : end + 6 + len(name)] != name:
            return False
        pos = end + 1 + _unpack_len(data, end + 1)[0]
        return pos == end + 6 + len(name) and data[pos:] == _FLUSH
    except (IndexError, ValueError, struct.error):  # truncated: not this shape
        return False


def decide(
    first: Verdict | None,
    combined: Verdict | None,
    *,
    session_target: Target | None = None,
    read_only_session: bool = False,
    pinned: bool = False,
) -> tuple[Target, RouteReason]:
    """Where a transaction opened by these messages runs (see the module docstring)."""
    if session_target is Target.PRIMARY:
        return Target.PRIMARY, RouteReason.SESSION_TARGET
    if pinned:
        return Target.PRIMARY, RouteReason.PINNED
    if combined is None:
        # Nothing to judge (a lone Sync or Describe of a known statement): wherever is cheapest.
        return Target.REPLICA, RouteReason.READ
    if combined.target is Target.PRIMARY:
        if combined.reason in SUSPECTED_WRITE_REASONS:
            if session_target is Target.REPLICA:
                return Target.REPLICA, RouteReason.SESSION_TARGET
            if read_only_session:
                return Target.REPLICA, RouteReason.READ_ONLY
        if combined.reason is Reason.HINT:
            return Target.PRIMARY, RouteReason.HINT
        return Target.PRIMARY, RouteReason.WRITE
    if combined.reason is Reason.HINT:
        return Target.REPLICA, RouteReason.HINT
    if first is not None and first.kind in _READ_ONLY_STARTS:
        return Target.REPLICA, RouteReason.READ_ONLY
    return Target.REPLICA, RouteReason.READ


_READ_ONLY_STARTS = frozenset(
    {StatementKind.BEGIN_READ_ONLY, StatementKind.SET_TRANSACTION_READ_ONLY}
)


def is_plain_select(sql: bytes) -> bool:
    """Whether the no-parse fast path takes ``sql`` as a plain read (for tests)."""
    return _PLAIN_SELECT.match(sql) is not None and _FOR_OR_INTO.search(sql) is None


def is_plain_write(sql: bytes) -> bool:
    """Whether the no-parse fast path takes ``sql`` as a write (for tests)."""
    return _PLAIN_WRITE.match(sql) is not None
