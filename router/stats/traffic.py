"""What each database's clients did through the router: PgBouncer's SHOW STATS figures.

A database is the name clients use, as in PgBouncer: a [databases] entry (for the "*" entry,
each name asked for), or a registry tenant, by its id. So two entries (or shared-schema
tenants) of one pool have rows of their own, and tenants of two clusters whose databases have
one name are not added up.

The data path adds to a database's ``Traffic`` as it forwards (a few additions per
transaction, no lock: the event loop is the only writer). The pools' janitor closes a period
every ``stats_period`` seconds; the averages are over the last closed period, as PgBouncer's.
The totals count since the process started and never go down, so /metrics serves them as
counters.

What counts, with the router's meaning of PgBouncer's words:
- a transaction: from the first message sent to a server connection (in a pipeline, from
  the end of the one before it) to its ReadyForQuery with status idle (a session's
  transactions, in session mode, likewise);
- a query: from a message sent to the ReadyForQuery that answers it (one per Query, or per
  Sync of the extended protocol); the router's own statements (settings replayed on a
  server connection, a reset) are not counted, nor a BEGIN the router answers itself while
  it decides where a split transaction goes (sent on with the next statement);
- received / sent: the client's bytes forwarded to a server, and the server's forwarded to
  the client (what the router answers itself is not traffic of a database);
- wait: how long a client's transaction waited for a server connection (of a full pool, or
  one being opened); not the router's own wait at a login.
"""

from __future__ import annotations

from dataclasses import dataclass

# The totals, in this order: counts, bytes, then seconds.
TOTALS = ("xact_count", "query_count", "received", "sent", "xact_time", "query_time", "wait_time")
_TIMES = frozenset({"xact_time", "query_time", "wait_time"})


class Traffic:
    """One database's counters (its clients', over every pool and node they use)."""

    __slots__ = (*TOTALS, "_closed", "period_delta", "period_seconds")

    def __init__(self) -> None:
        self.xact_count = 0
        self.query_count = 0
        self.received = 0
        self.sent = 0
        self.xact_time = 0.0  # seconds
        self.query_time = 0.0
        self.wait_time = 0.0
        self._closed: tuple = (0,) * len(TOTALS)  # the totals when the last period closed
        # The last closed period: how much each total grew in it, and how long it lasted.
        self.period_delta: tuple = (0,) * len(TOTALS)
        self.period_seconds = 0.0

    def totals(self) -> tuple:
        return (self.xact_count, self.query_count, self.received, self.sent,
                self.xact_time, self.query_time, self.wait_time)  # fmt: skip

    def close_period(self, seconds: float) -> None:
        """End the current period, ``seconds`` long: its growth becomes what averages read."""
        now = self.totals()
        self.period_delta = tuple(a - b for a, b in zip(now, self._closed, strict=True))
        self._closed = now
        self.period_seconds = seconds


# Where a connection not serving any database yet counts: read by nobody.
NO_TRAFFIC = Traffic()


@dataclass
class TrafficRow:
    """A database's totals and last period, as one worker reports them or several add up."""

    database: str
    totals: list
    delta: list
    seconds: float

    @classmethod
    def of(cls, database: str, traffic: Traffic) -> TrafficRow:
        return cls(database, list(traffic.totals()), list(traffic.period_delta), traffic.period_seconds)

    def add(self, other: TrafficRow) -> None:
        """Another worker's figures of the same database. The workers' periods close at
        about the same times; the longer one stands for both."""
        self.totals = [a + b for a, b in zip(self.totals, other.totals, strict=True)]
        self.delta = [a + b for a, b in zip(self.delta, other.delta, strict=True)]
        self.seconds = max(self.seconds, other.seconds)

    def total_columns(self) -> list[int]:
        """total_xact_count … total_wait_time, times in microseconds, as PgBouncer prints."""
        return [_micro(v) if name in _TIMES else v for name, v in zip(TOTALS, self.totals, strict=True)]

    def average_columns(self) -> list[int]:
        """avg_xact_count, avg_query_count, avg_recv, avg_sent (per second of the last
        period), avg_xact_time and avg_query_time (µs per transaction / query in it) and
        avg_wait_time (µs waited per second of it, as PgBouncer defines it). Zeros before
        the first period has closed."""
        xacts, queries, received, sent, xact_time, query_time, wait_time = self.delta
        seconds = self.seconds
        if seconds <= 0:
            return [0] * len(TOTALS)
        return [
            int(xacts / seconds), int(queries / seconds), int(received / seconds), int(sent / seconds),
            _micro(xact_time / xacts) if xacts else 0, _micro(query_time / queries) if queries else 0,
            _micro(wait_time / seconds),
        ]  # fmt: skip


def _micro(seconds: float) -> int:
    return round(seconds * 1_000_000)


def merge_rows(groups: list[list[TrafficRow]]) -> list[TrafficRow]:
    """Several workers' rows as one per database, in name order."""
    merged: dict[str, TrafficRow] = {}
    for rows in groups:
        for row in rows:
            into = merged.get(row.database)
            if into is None:
                merged[row.database] = TrafficRow(row.database, list(row.totals), list(row.delta), row.seconds)
            else:
                into.add(row)
    return [merged[name] for name in sorted(merged)]
