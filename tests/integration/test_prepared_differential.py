"""Named prepared statements through the router behave as on a dedicated connection: the same
wire messages (Parse, Bind, Describe, Execute, Close, Flush, Sync and simple Queries, several
segments in one write), sent through the router and straight to PostgreSQL, get the same
replies, message for message, while another client keeps using the pooled server connections
between the client's writes: it holds the one the client used last, so the client's next
transaction meets a server connection that lacks its statements, or prepares statements of its
own, which evict the client's (`max_prepared_statements` = 2). With and without read/write
splitting (named statements then live on replicas and the primary alike), and in session
mode (where they pass through as they are). Errors in a
transaction that had already failed are compared as errors only (see ``_comparable``); the
unnamed statement is used in the exchange that parses it (README: it does not outlive a
transaction in transaction mode).

Sequences come from hypothesis, derandomized: the same cases on every run, plus the cases it
once found, as explicit examples.
"""

from __future__ import annotations

import struct

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.cluster import Cluster
from tests.integration.test_prepared import answers, assert_settled, direct, exchange, kinds
from tests.integration.test_splitting import wait_replicas_eligible
from tests.rawclient import RawClient
from tests.unit.test_prepared import (
    FLUSH,
    SYNC,
    bind,
    close,
    describe,
    execute,
    parse,
    query,
    split,
)

INT4 = 23
NAMES = [b"s1", b"s2"]
# (text, parameter types) for each name: one parameter, none, an explicit type, a statement
# that fails when it runs (division by a zero parameter) and one that fails to parse. The
# names never share a text: an error naming a statement the client prepared under two names
# names the first (router/prepared.py client_names_in_error). The division has a volatile
# term: PostgreSQL folds `10 / $1` when it plans for the parameters (the first five runs of a
# statement), failing the Bind, and not in a generic plan, failing the Execute; the router's
# statements are shared, and have run more often than the client's own.
STATEMENTS = {
    b"s1": [(b"SELECT $1::int + 1", ()), (b"SELECT 42", ()), (b"SELECT $1 * 2", (INT4,)),
            (b"SELECT 10 / ($1::int + 0 * random()::int)", ()), (b"SELEC 1", ()),
            (b"SELECT generate_series(1, $1::int)", ())],
    b"s2": [(b"SELECT $1::int + 2", ()), (b"SELECT 43", ()), (b"SELECT $1 * 3", (INT4,)),
            (b"SELECT 20 / ($1::int + 0 * random()::int)", ()), (b"SELEC 2", ()),
            (b"SELECT generate_series(2, $1::int + 1)", ())],
}
PARAMS = [[b"3"], [b"0"], []]
_A, _B = STATEMENTS[b"s1"][0][0], STATEMENTS[b"s2"][0][0]

_messages = st.one_of(
    st.sampled_from(NAMES).flatmap(
        lambda name: st.sampled_from(STATEMENTS[name]).map(lambda stmt: parse(name, *stmt))
    ),
    # The unnamed statement lives on the server connection that parsed it, so a client uses
    # it in the exchange that parses it (as drivers do): see the README.
    st.builds(lambda stmt, params: parse(b"", *stmt) + bind(b"", b"", params) + execute(),
              st.sampled_from(STATEMENTS[b"s1"]), st.sampled_from(PARAMS)),
    # DEALLOCATE ALL run by an Execute (the router does not look up which statement runs),
    # ending its segment: a Parse behind it in the same segment is a documented limit.
    st.just(parse(b"", b"DEALLOCATE ALL") + bind(b"", b"") + execute() + SYNC),
    st.builds(lambda name, params: bind(b"", name, params) + execute(), st.sampled_from(NAMES), st.sampled_from(PARAMS)),
    st.builds(lambda name: describe(b"S", name), st.sampled_from(NAMES)),
    st.just(describe(b"P", b"")),
    st.builds(lambda name: close(b"S", name), st.sampled_from(NAMES)),
    st.just(FLUSH),
    # A named portal, fetched a row at a time (PortalSuspended); in a transaction block it
    # outlives the Sync.
    st.builds(lambda name, params: bind(b"p1", name, params), st.sampled_from(NAMES), st.sampled_from(PARAMS)),
    st.sampled_from([execute(b"p1", 1), execute(b"p1"), describe(b"P", b"p1"), close(b"P", b"p1")]),
)
_segment = st.lists(_messages, min_size=1, max_size=4).map(lambda parts: b"".join(parts) + SYNC)
QUERIES = ["BEGIN", "COMMIT", "ROLLBACK", "SELECT 1", "SELECT 1/0", "DISCARD ALL", "DEALLOCATE ALL",
           "SELECT 1; DEALLOCATE ALL", "DEALLOCATE ALL; SELECT 1/0", "/* c */ DEALLOCATE PREPARE ALL"]
_query = st.sampled_from(QUERIES).map(lambda sql: query(sql.encode()))
# Messages whose Sync comes in a later write (or never: a Query follows).
_unsynced = st.lists(_messages, min_size=1, max_size=3).map(b"".join)
# One write: a segment or a Query, or several in a row (a pipeline), maybe ending unsynced.
_write = st.tuples(
    st.lists(st.one_of(_segment, _segment, _query), min_size=1, max_size=3).map(b"".join),
    st.one_of(st.just(b""), st.just(b""), st.just(b""), _unsynced),
).map(b"".join)
# What the other client does before the client's next write (while the client is outside a
# transaction): nothing, hold a server connection through that write, or prepare statements.
OTHER = ["none", "hold", "evict"]
_steps = st.lists(st.tuples(_write, st.sampled_from(OTHER)), min_size=1, max_size=6)


@pytest.fixture(params=["primary", "split", "session"])
def pooled(start_router, request):
    split = request.param == "split"
    if request.param == "session":
        # The client, the other client and the holder each keep a server connection.
        router = start_router(pool_size=3, query_wait_timeout=5, pool_mode="session")
        router.session_mode = True
        return router
    router = start_router(pool_size=2, query_wait_timeout=5, split=split, max_prepared_statements=2)
    if split:
        wait_replicas_eligible(router)
    return router


def _show(write: bytes) -> str:
    """A write as a line to read: "P s1 'SELECT 42' | B s1 [3] | E | S | Q BEGIN"."""
    out = []
    for msg_type, body in split(write):
        kind = msg_type.decode()
        if kind == "P":
            name, text = body.split(b"\0")[:2]
            out.append(f"P {name.decode() or '-'} {text.decode()!r}")
        elif kind == "B":
            name = body.split(b"\0")[1]
            (count,) = struct.unpack_from("!H", body, len(body.split(b"\0")[0]) + len(name) + 4)
            out.append(f"B {name.decode() or '-'} {'[3|0]' if count else '[]'}")
        elif kind in "DC":
            out.append(f"{kind} {body[:1].decode()} {body[1:-1].decode() or '-'}")
        elif kind == "Q":
            out.append(f"Q {body[:-1].decode()}")
        else:
            out.append(kind)
    return " | ".join(out)


def _connect(router) -> RawClient:
    raw = RawClient(router.port)
    raw.startup("carol", "app")
    raw.recv_until(b"Z")
    return raw


def _comparable(replies, status: bytes) -> list:
    """``answers`` of the replies, except that an error in a transaction that had failed
    before its segment began is only "an error": there PostgreSQL reports 25P02 or what is
    wrong with the message itself (a wrong number of parameters, a syntax error), by the
    order of its checks, and a statement the router must prepare first on that server
    connection fails with 25P02 (see the README)."""
    out = []
    for reply in replies:
        if reply[0] == b"E" and status == b"E":
            out.append(("E", "in a failed transaction"))
        else:
            out += answers([reply])
        if reply[0] == b"Z":
            status = reply[1]
    return out


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=_steps)
# A statement parsed behind a DEALLOCATE ALL in one write was forgotten with the others.
@example(steps=[(query(b"DEALLOCATE ALL") + parse(b"s1", _A) + SYNC, "none")])
# A Parse behind an Execute behind a DISCARD ALL in one write did not wait for the discard.
@example(steps=[(parse(b"s1", _A) + SYNC, "none"),
                (query(b"DISCARD ALL") + parse(b"", _A) + bind(b"", b"", [b"3"]) + execute() + parse(b"s1", _A) + SYNC,
                 "none")])
# A DEALLOCATE ALL after another statement in one Query (or after a comment) was not seen.
@example(steps=[(parse(b"s1", _A) + SYNC, "none"), (query(b"SELECT 1; DEALLOCATE ALL"), "none"),
                (parse(b"s1", b"SELECT 42") + bind(b"", b"s1") + execute() + SYNC, "none")])
# Errors named the router's statement (pgr_N), also when a later segment had closed the name.
@example(steps=[(parse(b"s1", b"SELECT 42") + bind(b"", b"s1", [b"3"]) + execute() + SYNC, "none")])
@example(steps=[(parse(b"s2", _B) + bind(b"", b"s2") + execute() + SYNC + close(b"S", b"s2") + SYNC, "none")])
# A Parse answered by the router behind a BEGIN it answered too (splitting) said "idle".
@example(steps=[(parse(b"s1", _A) + SYNC + close(b"S", b"s1") + SYNC, "none"), (query(b"BEGIN"), "none"),
                (parse(b"s1", _A) + SYNC, "none")])
# A Parse in a failed transaction of a statement the server had succeeded (a no-op Close).
@example(steps=[(parse(b"s1", _A) + SYNC + close(b"S", b"s1") + SYNC, "none"),
                (query(b"BEGIN") + query(b"SELECT 1/0") + parse(b"s1", _A) + SYNC, "none")])
@example(steps=[(parse(b"s1", _A) + SYNC + close(b"S", b"s1") + SYNC, "none"),
                (query(b"BEGIN") + query(b"SELECT 1/0"), "none"), (parse(b"s1", _A) + SYNC, "none")])
def test_named_statements_answer_as_on_postgresql(pooled, cluster: Cluster, steps) -> None:
    _same_answers(pooled, cluster, steps)


def _same_answers(pooled, cluster: Cluster, steps) -> None:
    client, own = _connect(pooled), direct(cluster)
    other = psycopg.connect(pooled.dsn("carol"), autocommit=True)
    holder: psycopg.Connection | None = None
    status = b"I"
    try:
        unsynced = False
        for i, (write, action) in enumerate(steps):
            if unsynced and write[:1] == b"Q":
                # After an error the server discards messages up to a Sync, a Query too (no
                # ReadyForQuery for it): drivers end a segment before they send one.
                write = SYNC + write
            unsynced = split(write)[-1][0] not in (b"S", b"Q")
            idle = status == b"I"
            if idle and action == "hold":
                holder = psycopg.connect(pooled.dsn("carol"))
                holder.execute("SELECT 1")  # its transaction keeps the server connection
            elif idle and action == "evict":
                for k in range(3):
                    other.execute(f"SELECT {k} AS evicting", prepare=True)
            expected = exchange(own, write)
            replies = exchange(client, write)
            assert _comparable(replies, status) == _comparable(expected, status), (
                [(_show(w), a) for w, a in steps[: i + 1]], kinds(replies), kinds(expected)
            )
            status = expected[-1][1]
            if holder is not None:
                holder.close()
                holder = None
        # What each name means now, on whichever server connection serves the next transaction.
        end = SYNC + query(b"ROLLBACK") + b"".join(describe(b"S", name) + SYNC for name in NAMES[:2])
        other.execute("SELECT 'between'")
        assert _comparable(exchange(client, end), status) == _comparable(exchange(own, end), status), (
            [(_show(w), a) for w, a in steps], "the statements left"
        )
        if not getattr(pooled, "session_mode", False):  # (there the clients keep theirs)
            assert_settled(pooled)
    finally:
        for conn in (client, own):
            conn.close()
        other.close()
        if holder is not None:
            holder.close()
