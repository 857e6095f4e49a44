"""Named prepared statements under transaction pooling (router/prepared.py), sans-I/O.

Frontend messages go in as bytes; what comes out (rewritten messages, the reply queues, the
local answer to Parse+Sync) is checked exactly. Then a property test runs random message
sequences through the router's rewriting and reply handling against a small simulated
PostgreSQL (``FakeServer``) and compares what the client sees with what a direct connection
answers. The last section holds scripted sessions, among them the errors mid-pipeline that
once made the router's bookkeeping drift from the server's.

Message formats: PostgreSQL docs, 55.7 "Message Formats"; skipping to Sync after an error:
55.2.3 "Extended Query".
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.prepared import (
    ACTION,
    AS_PARSE_COMPLETE,
    CLOSE_REPLY,
    DUPLICATE,
    FORWARD,
    NAME,
    NOOP_NAME,
    PARSE_COMPLETE,
    PARSE_REPLY,
    REPLY,
    SEGMENT,
    SWALLOW,
    ClientStatement,
    ServerStatements,
    StatementRegistry,
    client_names_in_error,
    local_parse_reply,
    rewrite_for_server,
    statements_used,
)
from router.protocol.errors import ProtocolError
from router.protocol.framing import frame

# --- Frontend message builders (independent of the router's own codec) ---------------------------


def message(msg_type: bytes, body: bytes = b"") -> bytes:
    return msg_type + struct.pack("!I", len(body) + 4) + body


def cstr(value: bytes) -> bytes:
    return value + b"\0"


def parse_body(query: bytes, types: Sequence[int] = ()) -> bytes:
    """What follows the statement name in a Parse: the router's key for one statement."""
    return cstr(query) + struct.pack(f"!H{len(types)}I", len(types), *types)


def parse(name: bytes, query: bytes, types: Sequence[int] = ()) -> bytes:
    return message(b"P", cstr(name) + parse_body(query, types))


def bind(portal: bytes, statement: bytes, params: Sequence[bytes] = ()) -> bytes:
    body = cstr(portal) + cstr(statement) + struct.pack("!HH", 0, len(params))
    for param in params:
        body += struct.pack("!I", len(param)) + param
    return message(b"B", body + struct.pack("!H", 0))


def describe(kind: bytes, name: bytes) -> bytes:
    return message(b"D", kind + cstr(name))


def close(kind: bytes, name: bytes) -> bytes:
    return message(b"C", kind + cstr(name))


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return message(b"E", cstr(portal) + struct.pack("!I", max_rows))


def query(sql: bytes) -> bytes:
    return message(b"Q", cstr(sql))


SYNC = message(b"S")
FLUSH = message(b"H")
FUNCTION_CALL = message(b"F", struct.pack("!IHHH", 1234, 0, 0, 0))
READY_IDLE = b"Z\x00\x00\x00\x05I"
READY = (b"Z", b"I")
NOOP = close(b"S", NOOP_NAME)


def pipeline(*parts: bytes) -> bytes:
    """Messages (or Sync segments) sent in one write."""
    return b"".join(parts)


def split(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of each whole message in ``data``, checking every length field."""
    out = []
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("!I", data, pos + 1)
        assert length >= 4 and pos + 1 + length <= len(data), f"bad framing at {pos}: {data!r}"
        out.append((data[pos : pos + 1], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def raw_messages(data: bytes) -> list[bytes]:
    return [msg_type + struct.pack("!I", len(body) + 4) + body for msg_type, body in split(data)]


def parse_q(server: ServerStatements) -> list[tuple[int, int, bytes | None]]:
    """(segment, action, server name) of each Parse whose reply is owed."""
    return [(op[SEGMENT], op[ACTION], op[NAME]) for op in server.ops if op[REPLY] == PARSE_REPLY]


def close_q(server: ServerStatements) -> list[tuple[int, int]]:
    """(segment, action) of each Close whose reply is owed."""
    return [(op[SEGMENT], op[ACTION]) for op in server.ops if op[REPLY] == CLOSE_REPLY]


# --- The router's statement state ----------------------------------------------------------------

Q1, Q2, Q3 = b"SELECT 1", b"SELECT 2", b"SELECT 3"


@dataclass
class Session:
    """A router's statement state: the registry, one server connection, one client."""

    registry: StatementRegistry = field(default_factory=StatementRegistry)
    max_prepared: int = 250
    client: dict[bytes, ClientStatement] = field(default_factory=dict)
    server: ServerStatements = field(init=False)

    def __post_init__(self) -> None:
        self.server = self.new_server()

    def new_server(self) -> ServerStatements:
        return ServerStatements(self.max_prepared, self.registry.validated)

    def name(self, query: bytes, types: Sequence[int] = ()) -> bytes:
        """The server name the registry holds for a statement (it must have seen it)."""
        known = len(self.registry)
        name = self.registry.name_for(parse_body(query, types))
        assert len(self.registry) == known, f"the registry never saw {query!r}"
        return name

    def rewrite(
        self,
        data: bytes,
        client: dict[bytes, ClientStatement] | None = None,
        server: ServerStatements | None = None,
        forgets: Callable[[bytes], bool] | None = None,
        failed: bool = False,
    ) -> bytes:
        return rewrite_for_server(
            data,
            0,
            self.client if client is None else client,
            self.registry,
            self.server if server is None else server,
            forgets,
            failed,
        )

    def answered(self, server: ServerStatements | None = None) -> None:
        """The server replied to everything sent so far, without errors."""
        server = self.server if server is None else server
        while server.ops:
            op = server.ops.popleft()
            if op[REPLY] == PARSE_REPLY and op[NAME] is not None:
                server.validated.add(op[NAME])


# --- Parse ---------------------------------------------------------------------------------------


def test_named_parse_goes_out_under_the_server_name():
    s = Session()
    out = s.rewrite(parse(b"s1", Q1, (23,)))
    name = s.name(Q1, (23,))
    assert name != b"s1"
    assert split(out) == split(parse(name, Q1, (23,)))
    assert s.client == {b"s1": ClientStatement(name, parse(name, Q1, (23,)))}
    assert parse_q(s.server) == [(0, FORWARD, name)]
    assert close_q(s.server) == []
    assert list(s.server.prepared) == [name]
    assert name not in s.registry.validated  # only a ParseComplete validates


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        pytest.param((Q1, ()), (Q1, ()), True, id="same-text"),
        pytest.param((Q1, ()), (Q2, ()), False, id="other-text"),
        pytest.param((Q1, ()), (Q1, (23,)), False, id="same-text-other-types"),
        pytest.param((Q1, (23,)), (Q1, (20,)), False, id="other-types"),
        pytest.param((Q1, (23,)), (Q1, (23,)), True, id="same-text-same-types"),
    ],
)
def test_one_server_name_per_text_and_types(first, second, same):
    s = Session()
    s.rewrite(parse(b"a", *first) + parse(b"b", *second))
    assert (s.client[b"a"].server_name == s.client[b"b"].server_name) is same
    assert len(s.registry) == (1 if same else 2)


@pytest.mark.parametrize("other_client", [False, True], ids=["same-client", "second-client"])
def test_parse_of_a_text_the_server_has_becomes_a_noop_close(other_client):
    s = Session()
    s.rewrite(parse(b"s1", Q1))
    s.answered()
    client = {} if other_client else s.client
    out = s.rewrite(parse(b"s2", Q1), client=client)
    name = s.name(Q1)
    assert out == NOOP
    assert parse_q(s.server) == []
    assert close_q(s.server) == [(0, AS_PARSE_COMPLETE)]
    assert client[b"s2"] == ClientStatement(name, parse(name, Q1))
    assert list(s.server.prepared) == [name]


def test_parse_of_a_text_whose_parse_is_still_in_flight_is_a_noop_close_too():
    s = Session()
    out = s.rewrite(parse(b"s1", Q1) + parse(b"s2", Q1) + SYNC)
    name = s.name(Q1)
    assert split(out) == split(parse(name, Q1) + NOOP + SYNC)
    assert parse_q(s.server) == [(0, FORWARD, name)]
    assert close_q(s.server) == [(0, AS_PARSE_COMPLETE)]


def test_noop_close_refreshes_the_lru_position():
    s = Session(max_prepared=2)
    s.rewrite(parse(b"a", Q1) + parse(b"b", Q2))
    s.rewrite(parse(b"again", Q1))
    assert list(s.server.prepared) == [s.name(Q2), s.name(Q1)]


# --- Bind and Describe of a named statement ------------------------------------------------------

USE_CASES = [
    pytest.param(
        bind(b"", b"s1", [b"42"]), lambda name: bind(b"", name, [b"42"]), id="bind-unnamed-portal"
    ),
    pytest.param(
        bind(b"portal", b"s1", [b"x", b""]),
        lambda name: bind(b"portal", name, [b"x", b""]),
        id="bind-named-portal",
    ),
    pytest.param(describe(b"S", b"s1"), lambda name: describe(b"S", name), id="describe-statement"),
]


@pytest.mark.parametrize(("sent", "expected"), USE_CASES)
def test_use_on_a_server_lacking_the_statement_injects_its_parse(sent, expected):
    s = Session()
    s.rewrite(parse(b"s1", Q1))  # on another server connection
    other = s.new_server()
    out = s.rewrite(sent + execute() + SYNC, server=other)
    name = s.name(Q1)
    assert split(out) == split(parse(name, Q1) + expected(name) + execute() + SYNC)
    assert parse_q(other) == [(0, SWALLOW, name)]
    assert close_q(other) == []
    assert list(other.prepared) == [name]


@pytest.mark.parametrize(("sent", "expected"), USE_CASES)
def test_use_on_a_server_having_the_statement_only_renames(sent, expected):
    s = Session()
    s.rewrite(parse(b"s1", Q1) + parse(b"s2", Q2))
    s.answered()
    out = s.rewrite(sent)
    assert out == expected(s.name(Q1))
    assert parse_q(s.server) == [] and close_q(s.server) == []
    assert list(s.server.prepared) == [s.name(Q2), s.name(Q1)]  # most recently used last


def test_statement_injected_once_per_server_even_when_used_twice_in_a_chunk():
    s = Session()
    s.rewrite(parse(b"s1", Q1))
    other = s.new_server()
    name = s.name(Q1)
    out = s.rewrite(describe(b"S", b"s1") + bind(b"", b"s1") + execute() + SYNC, server=other)
    assert split(out) == split(
        parse(name, Q1) + describe(b"S", name) + bind(b"", name) + execute() + SYNC
    )
    assert parse_q(other) == [(0, SWALLOW, name)]


# --- Close ---------------------------------------------------------------------------------------


def test_close_of_a_named_statement_is_a_noop_close_and_forgets_only_that_clients_name():
    s = Session()
    other_client: dict[bytes, ClientStatement] = {}
    s.rewrite(parse(b"s1", Q1) + parse(b"keep", Q2))
    s.rewrite(parse(b"s1", Q1), client=other_client)
    s.answered()
    out = s.rewrite(close(b"S", b"s1"))
    assert out == NOOP
    assert list(s.client) == [b"keep"]
    assert other_client == {b"s1": ClientStatement(s.name(Q1), parse(s.name(Q1), Q1))}
    # The server statement stays: other clients share it.
    assert set(s.server.prepared) == {s.name(Q1), s.name(Q2)}
    assert close_q(s.server) == [(0, FORWARD)]
    assert parse_q(s.server) == []


def test_close_of_a_name_the_client_never_prepared_is_a_noop_close():
    s = Session()
    assert s.rewrite(close(b"S", b"never")) == NOOP
    assert close_q(s.server) == [(0, FORWARD)]


# --- What passes through untouched ---------------------------------------------------------------

UNTOUCHED = [
    pytest.param(parse(b"", Q1), [(0, FORWARD, None)], [], id="unnamed-parse"),
    pytest.param(parse(b"", Q1, (23, 25)), [(0, FORWARD, None)], [], id="unnamed-parse-types"),
    pytest.param(bind(b"", b"", [b"1"]), [], [], id="bind-unnamed"),
    pytest.param(bind(b"portal", b"", [b"1"]), [], [], id="bind-named-portal-unnamed-statement"),
    pytest.param(bind(b"", b"unknown"), [], [], id="bind-statement-client-never-prepared"),
    pytest.param(describe(b"S", b""), [], [], id="describe-unnamed-statement"),
    pytest.param(describe(b"P", b""), [], [], id="describe-unnamed-portal"),
    pytest.param(describe(b"P", b"s1"), [], [], id="describe-portal-named-like-a-statement"),
    pytest.param(describe(b"S", b"unknown"), [], [], id="describe-statement-never-prepared"),
    pytest.param(close(b"S", b""), [], [(0, FORWARD)], id="close-unnamed-statement"),
    pytest.param(close(b"P", b"s1"), [], [(0, FORWARD)], id="close-portal"),
    pytest.param(execute(b"s1", 10), [], [], id="execute"),
    pytest.param(SYNC, [], [], id="sync"),
    pytest.param(FLUSH, [], [], id="flush"),
    pytest.param(query(b"SELECT 1"), [], [], id="query"),
    pytest.param(FUNCTION_CALL, [], [], id="function-call"),
    pytest.param(
        pipeline(
            parse(b"", Q1), bind(b"", b""), describe(b"P", b""), execute(), close(b"P", b""), SYNC
        ),
        [(0, FORWARD, None)],
        [(0, FORWARD)],
        id="unnamed-pipeline",
    ),
]


@pytest.mark.parametrize(("data", "parses", "closes"), UNTOUCHED)
def test_unnamed_statements_and_portals_pass_through_as_the_same_object(data, parses, closes):
    s = Session()
    s.client[b"s1"] = ClientStatement(b"pgr_x", parse(b"pgr_x", Q1))  # a named one exists
    before = dict(s.client)
    assert s.rewrite(data) is data
    assert parse_q(s.server) == parses
    assert close_q(s.server) == closes
    assert list(s.server.prepared) == []
    assert s.client == before
    assert len(s.registry) == 0


def test_verbatim_stretches_around_a_rewritten_message_are_kept_in_order():
    s = Session()
    s.rewrite(parse(b"s1", Q1))
    s.answered()
    name = s.name(Q1)
    head = parse(b"", Q2) + bind(b"", b"") + execute()
    tail = execute(b"p") + SYNC + query(b"SELECT 9")
    out = s.rewrite(head + bind(b"p", b"s1", [b"7"]) + tail)
    assert out == head + bind(b"p", name, [b"7"]) + tail


def test_tail_of_a_partly_sent_message_and_a_trailing_partial_message_go_out_as_is():
    s = Session()
    tail_of_previous = b"tail-bytes"
    partial = execute(b"p")[:7]
    data = tail_of_previous + parse(b"s1", Q1) + partial
    out = rewrite_for_server(data, len(tail_of_previous), s.client, s.registry, s.server)
    name = s.name(Q1)
    assert out == tail_of_previous + parse(name, Q1) + partial
    assert parse_q(s.server) == [(0, FORWARD, name)]


def test_a_partial_header_at_the_end_is_left_alone():
    s = Session()
    data = parse(b"s1", Q1) + b"B\x00\x00"
    out = s.rewrite(data)
    assert out == parse(s.name(Q1), Q1) + b"B\x00\x00"


# --- Eviction ------------------------------------------------------------------------------------


def test_beyond_max_prepared_the_least_recently_used_is_closed_and_its_reply_swallowed():
    s = Session(max_prepared=2)
    s.rewrite(parse(b"a", Q1) + parse(b"b", Q2) + SYNC)
    s.answered()
    s.server.recv_z = s.server.sent_z = 1
    s.rewrite(bind(b"", b"a") + execute() + SYNC)  # a is now the most recently used
    s.server.recv_z = s.server.sent_z = 2
    out = s.rewrite(parse(b"c", Q3))
    a, b, c = s.name(Q1), s.name(Q2), s.name(Q3)
    assert split(out) == split(close(b"S", b) + parse(c, Q3))
    assert close_q(s.server) == [(2, SWALLOW)]
    assert parse_q(s.server) == [(2, FORWARD, c)]
    assert list(s.server.prepared) == [a, c]


def test_eviction_for_an_injected_parse():
    s = Session(max_prepared=1)
    s.rewrite(parse(b"a", Q1) + parse(b"b", Q2))  # b evicted a on this server
    s.answered()
    out = s.rewrite(bind(b"", b"a") + execute() + SYNC)
    a, b = s.name(Q1), s.name(Q2)
    assert split(out) == split(close(b"S", b) + parse(a, Q1) + bind(b"", a) + execute() + SYNC)
    assert close_q(s.server) == [(0, SWALLOW)]
    assert parse_q(s.server) == [(0, SWALLOW, a)]
    assert list(s.server.prepared) == [a]


# --- Sync segments -------------------------------------------------------------------------------


def test_segments_advance_on_sync_query_and_function_call_not_on_flush():
    s = Session()
    s.server.sent_z = 5  # five earlier ReadyForQuery owed or received
    s.rewrite(
        pipeline(
            parse(b"a", Q1) + SYNC,
            parse(b"b", Q2) + query(b"SELECT 0"),
            parse(b"", Q1) + close(b"S", b"x") + FUNCTION_CALL,
            parse(b"c", Q3) + FLUSH + close(b"P", b""),
        )
    )
    a, b, c = s.name(Q1), s.name(Q2), s.name(Q3)
    parses = [(5, FORWARD, a), (6, FORWARD, b), (7, FORWARD, None), (8, FORWARD, c)]
    assert parse_q(s.server) == parses
    assert close_q(s.server) == [(7, FORWARD), (8, FORWARD)]
    assert s.server.sent_z == 5  # counting sent Syncs is the caller's job


# --- on_error ------------------------------------------------------------------------------------

# Segment 0: Parse a.  Segment 1: Parse b, a no-op Close, an unnamed Parse, Parse of a's text
# (its Parse in segment 0 is unanswered and could yet be skipped: a Close of it, then its Parse
# again), Bind of c on a server lacking it (injected Parse).  Segment 2: Parse d.
ERROR_PIPELINE = pipeline(
    parse(b"a", Q1) + SYNC,
    parse(b"b", Q2) + close(b"S", b"gone") + parse(b"", Q1) + parse(b"a2", Q1),
    bind(b"", b"c") + SYNC,
    parse(b"d", b"SELECT 4") + SYNC,
)
# The requests it queues, in order: (reply, segment, action, statement).
ERROR_PIPELINE_OPS = [
    ("1", 0, FORWARD, "a"),
    ("1", 1, FORWARD, "b"),
    ("3", 1, FORWARD, None),
    ("1", 1, FORWARD, None),
    ("3", 1, SWALLOW, "a"),
    ("1", 1, FORWARD, "a"),
    ("1", 1, SWALLOW, "c"),
    ("1", 2, FORWARD, "d"),
]


@pytest.mark.parametrize(
    ("answered", "recv_z", "prepared", "client"),
    [
        pytest.param(0, 0, {"a", "b", "c", "d"}, {"b", "a2", "c", "d"}, id="error-in-segment-0"),
        pytest.param(1, 1, {"a", "d"}, {"a", "c", "d"}, id="error-at-start-of-segment-1"),
        pytest.param(4, 1, {"a", "b", "d"}, {"a", "b", "c", "d"}, id="error-late-in-segment-1"),
        pytest.param(7, 2, {"a", "b", "c"}, {"a", "b", "a2", "c"}, id="error-in-segment-2"),
    ],
)
def test_on_error_drops_the_failing_segments_requests_and_puts_back_what_they_changed(
    answered, recv_z, prepared, client
):
    s = Session()
    s.registry.name_for(parse_body(Q3))
    s.client[b"c"] = ClientStatement(s.name(Q3), parse(s.name(Q3), Q3))  # from another server
    s.rewrite(ERROR_PIPELINE)
    names = {None: None, "a": s.name(Q1), "b": s.name(Q2), "c": s.name(Q3)}
    names["d"] = s.name(b"SELECT 4")
    queued = [(chr(op[REPLY]), op[SEGMENT], op[ACTION], op[NAME]) for op in s.server.ops]
    assert queued == [(r, seg, action, names[n]) for r, seg, action, n in ERROR_PIPELINE_OPS]
    assert set(s.server.prepared) == {names[n] for n in "abcd"}
    for _ in range(answered):  # replies received before the ErrorResponse
        s.server.ops.popleft()
    s.server.recv_z = recv_z
    s.server.on_error()
    left = [(chr(op[REPLY]), op[SEGMENT], op[ACTION], op[NAME]) for op in s.server.ops]
    expected = [op for op in ERROR_PIPELINE_OPS[answered:] if op[1] != recv_z]
    assert left == [(r, seg, action, names[n]) for r, seg, action, n in expected]
    assert set(s.server.prepared) == {names[n] for n in prepared}
    assert set(s.client) == {name.encode() for name in client}


def test_on_error_keeps_later_segments_and_a_statement_prepared_earlier():
    s = Session()
    s.rewrite(parse(b"a", Q1) + SYNC)
    s.answered()
    s.server.sent_z = s.server.recv_z = 1
    s.rewrite(parse(b"again", Q1) + SYNC + parse(b"b", Q2) + SYNC)
    s.server.sent_z = 3
    s.server.on_error()  # in segment 1: its no-op Close gets no reply; a stays prepared
    assert b"again" not in s.client
    assert close_q(s.server) == []
    assert parse_q(s.server) == [(2, FORWARD, s.name(Q2))]
    assert set(s.server.prepared) == {s.name(Q1), s.name(Q2)}


# --- Messages that wait for the replies owed ----------------------------------------------------

# (earlier segment, later segment, whether the client has "a" before): the later one names "a",
# whose Parse or Close in the earlier segment may yet fail or be skipped.
WAITS = [
    pytest.param(parse(b"a", Q1), parse(b"a", Q2), False, id="parse-after-parse"),
    pytest.param(parse(b"a", Q1), bind(b"", b"a") + execute(), False, id="bind-after-parse"),
    pytest.param(parse(b"a", Q1), describe(b"S", b"a"), False, id="describe-after-parse"),
    pytest.param(close(b"S", b"a"), bind(b"", b"a") + execute(), True, id="bind-after-close"),
    pytest.param(close(b"S", b"a"), parse(b"a", Q2), True, id="parse-after-close"),
    pytest.param(close(b"S", b"a"), parse(b"a", Q2), False, id="parse-after-close-of-nothing"),
    pytest.param(parse(b"a", Q2), describe(b"S", b"a"), True, id="describe-after-parse-42P05"),
]


@pytest.mark.parametrize(("earlier", "later", "had"), WAITS)
def test_a_message_naming_a_statement_with_a_request_unanswered_in_an_earlier_segment_waits(
    earlier, later, had
):
    s = Session()
    if had:
        s.rewrite(parse(b"a", Q1) + SYNC)
        s.answered()
        s.server.sent_z = s.server.recv_z = 1
    first = bind(b"", b"x") + earlier + SYNC  # "x": a statement the client does not have
    out = s.rewrite(first + later + SYNC + parse(b"b", Q3) + SYNC)
    assert s.server.wait_from == len(first)
    # What goes out is the first segment (rewritten), and only its requests are queued.
    assert out.endswith(SYNC) and sync_points(out) == 1
    assert {op[SEGMENT] for op in s.server.ops} <= {s.server.sent_z}
    # Once everything sent is answered, the rest goes.
    s.server.sent_z += 1
    s.answered()
    s.server.recv_z = s.server.sent_z
    s.rewrite(later + SYNC + parse(b"b", Q3) + SYNC)
    assert s.server.wait_from == -1


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(parse(b"a", Q1) + bind(b"", b"a") + describe(b"S", b"a") + SYNC, id="same-segment"),
        pytest.param(parse(b"a", Q1) + SYNC + close(b"S", b"a") + SYNC, id="close"),
        pytest.param(parse(b"a", Q1) + SYNC + parse(b"b", Q1) + bind(b"", b"c") + SYNC, id="other-names"),
        pytest.param(parse(b"", Q1) + SYNC + bind(b"", b"") + SYNC, id="unnamed"),
    ],
)
def test_messages_whose_meaning_is_known_when_sent_do_not_wait(data):
    s = Session()
    name = s.registry.name_for(parse_body(Q2))
    s.client[b"c"] = ClientStatement(name, parse(name, Q2))
    s.rewrite(data)
    assert s.server.wait_from == -1


# --- local_parse_reply ---------------------------------------------------------------------------

ONE = b"1\x00\x00\x00\x04"

LOCAL = [
    pytest.param(parse(b"s1", Q1) + SYNC, [Q1], ONE + READY_IDLE, id="one-parse"),
    pytest.param(
        parse(b"s1", Q1) + parse(b"s2", Q2) + SYNC, [Q1, Q2], ONE * 2 + READY_IDLE, id="two-parses"
    ),
    pytest.param(parse(b"s1", Q1) + parse(b"s2", Q2) + SYNC, [Q1], None, id="one-not-validated"),
    pytest.param(parse(b"s1", Q2) + SYNC, [Q1], None, id="not-validated"),
    pytest.param(parse(b"s1", b"SELECT 99") + SYNC, [Q1], None, id="never-seen-text"),
    pytest.param(parse(b"s1", Q1, (23,)) + SYNC, [Q1], None, id="validated-without-types"),
    pytest.param(parse(b"", Q1) + SYNC, [Q1], None, id="unnamed"),
    pytest.param(parse(b"s1", Q1), [Q1], None, id="no-sync"),
    pytest.param(SYNC, [Q1], None, id="sync-alone"),
    pytest.param(parse(b"s1", Q1) + SYNC + SYNC, [Q1], None, id="two-syncs"),
    pytest.param(parse(b"s1", Q1) + SYNC + parse(b"s2", Q1), [Q1], None, id="more-after-sync"),
    pytest.param(parse(b"s1", Q1) + SYNC[:-1], [Q1], None, id="partial-sync"),
    pytest.param(parse(b"s1", Q1) + SYNC + b"S", [Q1], None, id="partial-header-after-sync"),
    pytest.param(parse(b"s1", Q1) + FLUSH + SYNC, [Q1], None, id="flush"),
    pytest.param(parse(b"s1", Q1) + describe(b"S", b"s1") + SYNC, [Q1], None, id="describe"),
    pytest.param(parse(b"s1", Q1) + bind(b"", b"s1") + SYNC, [Q1], None, id="bind"),
    pytest.param(parse(b"s1", Q1) + close(b"S", b"s0") + SYNC, [Q1], None, id="close"),
    pytest.param(parse(b"s1", Q1) + query(b"SELECT 1"), [Q1], None, id="query-not-sync"),
    pytest.param(query(b"SELECT 1"), [Q1], None, id="query"),
    pytest.param(message(b"P", b"s1") + SYNC, [Q1], None, id="unterminated-name"),
    pytest.param(parse(b"s0", Q1) + SYNC, [Q1], None, id="name-the-client-has"),
    pytest.param(parse(b"s1", Q1) + parse(b"s1", Q1) + SYNC, [Q1], None, id="same-name-twice"),
]


@pytest.mark.parametrize(("data", "validated", "reply"), LOCAL)
def test_local_parse_reply(data, validated, reply):
    s = Session()
    s.client[b"s0"] = ClientStatement(b"pgr_x", parse(b"pgr_x", Q3))
    for text in (Q1, Q2):
        s.registry.name_for(parse_body(text))
    for text in validated:
        s.registry.validated.add(s.name(text))
    before = dict(s.client)
    assert local_parse_reply(data, 0, s.client, s.registry) == reply
    assert len(s.registry) == 2  # never names a statement
    if reply is None:
        assert s.client == before
    else:
        parsed = [body for msg_type, body in split(data) if msg_type == b"P"]
        for body in parsed:
            client_name, _, key = body.partition(b"\0")
            server_name = s.registry.name_for(key)
            expected = ClientStatement(server_name, message(b"P", cstr(server_name) + key))
            assert s.client[client_name] == expected
        assert len(s.client) == len(before) + len(parsed)


def test_local_reply_then_bind_on_a_server_injects_the_recorded_parse():
    s = Session()
    s.rewrite(parse(b"elsewhere", Q1, (23,)))
    s.answered()
    assert local_parse_reply(parse(b"mine", Q1, (23,)) + SYNC, 0, s.client, s.registry)
    other = s.new_server()
    name = s.name(Q1, (23,))
    out = s.rewrite(bind(b"", b"mine", [b"5"]) + execute() + SYNC, server=other)
    assert split(out) == split(parse(name, Q1, (23,)) + bind(b"", name, [b"5"]) + execute() + SYNC)


# --- Malformed input -----------------------------------------------------------------------------

MALFORMED = [
    pytest.param(message(b"P", b"s1"), id="parse-name-without-nul"),
    # The NUL search must stop at the message's end, not find one in the next message.
    pytest.param(message(b"P", b"s1") + SYNC, id="parse-name-without-nul-then-sync"),
    pytest.param(message(b"B", b"portal"), id="bind-portal-without-nul"),
    pytest.param(message(b"B", b"\0s1"), id="bind-statement-without-nul"),
    pytest.param(message(b"B", b"p\0s1") + SYNC, id="bind-statement-without-nul-then-sync"),
    # Not read as the name b"s" with its last byte taken for the NUL:
    pytest.param(message(b"D", b"Ss1"), id="describe-statement-without-nul"),
    pytest.param(message(b"C", b"Ss1"), id="close-statement-without-nul"),
    pytest.param(message(b"C", b"Ss\0\0"), id="close-statement-trailing-bytes"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_message_raises_protocol_error(data):
    s = Session()
    s.client[b"s"] = ClientStatement(b"pgr_x", parse(b"pgr_x", Q1))
    with pytest.raises(ProtocolError):
        s.rewrite(data)


# --- A simulated PostgreSQL, and the router between it and a client ------------------------------


def _error(sqlstate: bytes) -> bytes:
    return message(b"E", b"SERROR\0C" + sqlstate + b"\0\0")


SYNTAX_ERROR = _error(b"42601")
UNDEFINED_STATEMENT = _error(b"26000")  # prepared statement "..." does not exist
DUPLICATE_STATEMENT = _error(b"42P05")
DUPLICATE_PORTAL = _error(b"42P03")
UNDEFINED_PORTAL = _error(b"34000")
WRONG_PARAMETER_COUNT = _error(b"08P01")  # bind message supplies N parameters, but ...


HANDLERS = {
    b"P": "_parse",
    b"B": "_bind",
    b"D": "_describe",
    b"C": "_close",
    b"E": "_execute",
    b"S": "_sync",
    b"H": "_flush",
    b"Q": "_query",
}


class FakeServer:
    """Just enough PostgreSQL for these messages (55.2.3): named and unnamed statements and
    portals; after an error everything up to Sync is skipped; a Sync ends the implicit
    transaction (portals go); a simple Query drops the unnamed statement. Replies carry what
    identifies the statement (its text and types) so a mix-up shows in the client's bytes."""

    def __init__(self) -> None:
        self.statements: dict[bytes, bytes] = {}  # name -> parse_body
        self.portals: dict[bytes, bytes] = {}  # name -> result tag
        self.skipping = False
        self.output = bytearray()

    def receive(self, data: bytes) -> None:
        for msg_type, body in split(data):
            if self.skipping and msg_type != b"S":
                continue
            reply = getattr(self, HANDLERS[msg_type])(body)
            if reply.startswith(b"E"):
                self.skipping = True
            self.output += reply

    def take_output(self) -> bytes:
        out = bytes(self.output)
        self.output.clear()
        return out

    def _parse(self, body: bytes) -> bytes:
        name, _, key = body.partition(b"\0")
        if key.startswith(b"SELEC "):
            return SYNTAX_ERROR
        if name and name in self.statements:
            return DUPLICATE_STATEMENT
        self.statements[name] = key
        return message(b"1")

    def _bind(self, body: bytes) -> bytes:
        portal, statement, rest = body.split(b"\0", 2)
        key = self.statements.get(statement)
        if key is None:
            return UNDEFINED_STATEMENT
        n_formats = struct.unpack_from("!H", rest)[0]
        pos = 2 + 2 * n_formats
        n_params = struct.unpack_from("!H", rest, pos)[0]
        pos += 2
        params = []
        for _ in range(n_params):
            (length,) = struct.unpack_from("!I", rest, pos)
            params.append(rest[pos + 4 : pos + 4 + length])
            pos += 4 + length
        if n_params != key.count(b"$"):
            return WRONG_PARAMETER_COUNT
        if portal and portal in self.portals:
            return DUPLICATE_PORTAL
        self.portals[portal] = b"RESULT " + key + b"|" + b",".join(params)
        return message(b"2")

    def _describe(self, body: bytes) -> bytes:
        name = body[1:-1]
        if body[:1] == b"S":
            key = self.statements.get(name)
            if key is None:
                return UNDEFINED_STATEMENT
            return message(b"t", key) + message(b"n")
        tag = self.portals.get(name)
        return UNDEFINED_PORTAL if tag is None else message(b"T", tag)

    def _close(self, body: bytes) -> bytes:
        (self.statements if body[:1] == b"S" else self.portals).pop(body[1:-1], None)
        return message(b"3")

    def _execute(self, body: bytes) -> bytes:
        tag = self.portals.get(body[: body.index(b"\0")])
        return UNDEFINED_PORTAL if tag is None else message(b"C", cstr(tag))

    def _sync(self, body: bytes) -> bytes:
        self.skipping = False
        self.portals.clear()
        return READY_IDLE

    def _flush(self, body: bytes) -> bytes:
        return b""

    def _query(self, body: bytes) -> bytes:
        self.statements.pop(b"", None)
        self.portals.clear()
        return message(b"C", cstr(b"QUERY " + body[:-1])) + READY_IDLE


def router_replies(server: ServerStatements, data: bytes) -> bytes:
    """What ServerConnection.data_received (router/backend/server.py) forwards to the client
    for ``data``, with the same use of the reply queues, one whole message at a time."""
    out = []
    for raw in raw_messages(data):
        msg_type = raw[:1]
        if msg_type == b"Z":
            server.recv_z += 1
        elif msg_type == b"E":
            ops = server.ops
            if ops and ops[0][ACTION] == DUPLICATE and ops[0][SEGMENT] == server.recv_z:
                raw = server.duplicate_error(raw)
            server.on_error()
        elif server.ops and msg_type in (b"1", b"3"):
            op = server.ops.popleft()
            action = op[ACTION]
            if msg_type == b"1" and op[NAME] is not None:
                server.validated.add(op[NAME])
            if action == SWALLOW:
                continue
            if action == AS_PARSE_COMPLETE:
                raw = PARSE_COMPLETE
            elif action == DUPLICATE:
                server.commit_duplicate(op)
        out.append(raw)
    return b"".join(out)


def sync_points(data: bytes) -> int:
    return sum(1 for msg_type, _ in split(data) if msg_type in (b"S", b"Q", b"F"))


@dataclass
class SimClient:
    statements: dict[bytes, ClientStatement] = field(default_factory=dict)
    direct: FakeServer = field(default_factory=FakeServer)  # its own connection to PostgreSQL
    expected: bytearray = field(default_factory=bytearray)  # what that connection answered
    seen: bytearray = field(default_factory=bytearray)  # what the router answered
    linked: bool = False  # holds a server connection
    # What waits until the server has answered everything sent (ServerStatements.wait_from).
    waiting: bytes = b""

    def say_directly(self, data: bytes) -> None:
        self.direct.receive(data)
        self.expected += self.direct.take_output()

    def assert_same_answers(self) -> None:
        assert split(bytes(self.seen)) == split(bytes(self.expected))


class Simulation:
    """Clients, server connections and the router's statement state between them. client.py's
    part (what goes where in which chunk, Sync counting, the local Parse+Sync answer) and
    server.py's (``router_replies``) are done here by hand."""

    def __init__(self, max_prepared: int = 250, clients: int = 2, servers: int = 2) -> None:
        self.registry = StatementRegistry()
        self.clients = [SimClient() for _ in range(clients)]
        self.servers = [
            (FakeServer(), ServerStatements(max_prepared, self.registry.validated))
            for _ in range(servers)
        ]

    def send(self, client: SimClient, server: int, data: bytes) -> None:
        """One chunk from the client through the router. Without a server connection, a chunk
        of named Parses of validated statements and a Sync is answered by the router. Behind
        a message that waits for the replies owed, everything waits."""
        if client.waiting:
            client.waiting += data
            return
        if not client.linked and sync_points(data) == 1:
            reply = local_parse_reply(data, 0, client.statements, self.registry)
            if reply is not None:
                client.seen += reply
                return
        client.linked = True
        fake, stmts = self.servers[server]
        fake.receive(rewrite_for_server(data, 0, client.statements, self.registry, stmts))
        if stmts.wait_from >= 0:
            data, client.waiting = data[: stmts.wait_from], data[stmts.wait_from :]
        stmts.sent_z += sync_points(data)

    def deliver(self, client: SimClient, server: int) -> None:
        """The router reads what the server sent so far; with nothing owed it sends what
        waited for that, or else lets go."""
        fake, stmts = self.servers[server]
        client.seen += router_replies(stmts, fake.take_output())
        while stmts.sent_z == stmts.recv_z and client.waiting:
            waiting, client.waiting = client.waiting, b""
            self.send(client, server, waiting)
            client.seen += router_replies(stmts, fake.take_output())
        if stmts.sent_z == stmts.recv_z:
            client.linked = False

    def run(self, client: int, server: int, chunks: Sequence[bytes]) -> SimClient:
        """Request-response: each chunk is sent, then every reply so far delivered."""
        c = self.clients[client]
        for chunk in chunks:
            c.say_directly(chunk)
            self.send(c, server, chunk)
            self.deliver(c, server)
        return c

    def assert_settled(self) -> None:
        """After the final Sync: nothing owed, and the router's belief is the server's truth."""
        for fake, stmts in self.servers:
            assert parse_q(stmts) == [] and close_q(stmts) == []
            assert stmts.sent_z == stmts.recv_z
            assert set(stmts.prepared) == {name for name in fake.statements if name}


# --- Property: the client cannot tell the router from a direct connection ------------------------

NAMES = [b"a", b"b", b"c", b"d"]
NEVER_PREPARED = b"zz"
PORTALS = [b"", b"p"]
# Mostly one parameter, so that most Binds succeed; the same text with other types is another
# statement.
TEXTS = [
    (b"SELECT $1", ()),
    (b"SELECT $1", (23,)),
    (b"SELECT $1 + 1", ()),
    (b"SELECT $1 + 2", ()),
    (b"SELECT 1", ()),
]
BAD_TEXT = (b"SELEC 1", ())  # a syntax error: its Parse fails
PARAMS = [[b"7"], [b"8"], [], [b"7", b"8"]]
USED_NAMES = [*NAMES, NEVER_PREPARED]

# Every message the property test sends, by kind: (kind, name, message). Drawn from these lists
# rather than built per example: it keeps hypothesis's generation cheap.
PARSES = [("parse", n, parse(n, *t)) for n in NAMES for t in TEXTS]
OPS_BY_KIND = {
    "parse": PARSES,
    "parse-bad": [("parse-bad", n, parse(n, *BAD_TEXT)) for n in NAMES],
    "bind": [("use", n, bind(p, n, ps)) for p in PORTALS for n in USED_NAMES for ps in PARAMS],
    "describe": [("use", n, describe(b"S", n)) for n in USED_NAMES],
    "close": [("close", n, close(b"S", n)) for n in [*NAMES, b""]],
    "unnamed": [
        ("unnamed", b"", parse(b"", *t) + bind(p, b"", ps))
        for t in [*TEXTS, BAD_TEXT]
        for p in PORTALS
        for ps in PARAMS
    ],
    "portal": [
        *[("unnamed", b"", describe(b"P", p)) for p in PORTALS],
        *[("unnamed", b"", execute(p)) for p in PORTALS],
        *[("unnamed", b"", close(b"P", p)) for p in PORTALS],
        ("unnamed", b"", FLUSH),
    ],
}
# How often each kind is drawn: mostly what names statements.
WEIGHTS = {
    "parse": 3,
    "parse-bad": 1,
    "bind": 3,
    "close": 2,
    "describe": 1,
    "unnamed": 1,
    "portal": 2,
}
KINDS = [kind for kind, weight in WEIGHTS.items() for _ in range(weight)]
OPS = st.builds(
    lambda kind, i: OPS_BY_KIND[kind][i % len(OPS_BY_KIND[kind])],
    st.sampled_from(KINDS),
    st.integers(0, 255),
)
EXTENDED_SEGMENT = st.tuples(st.lists(OPS, max_size=6), st.just(SYNC))
SEGMENTS = st.lists(
    st.one_of(
        EXTENDED_SEGMENT,
        st.tuples(
            st.lists(st.sampled_from(PARSES), min_size=1, max_size=2),  # as PQprepare
            st.just(SYNC),
        ),
        st.just(((), query(b"SELECT 0"))),  # a simple Query only where a Sync has just been
    ),
    min_size=1,
    max_size=4,
)
# (client, server connection, segments) per turn: a client holds a server connection.
CLIENT = SERVER = st.integers(0, 1)
TURNS = st.lists(st.tuples(CLIENT, SERVER, SEGMENTS), min_size=1, max_size=8)


PROPERTY = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(TURNS, st.sampled_from([2, 250]), st.booleans(), st.data())
def test_router_answers_what_a_direct_connection_answers(turns, max_prepared, pipelined, data):
    """Two clients take turns on two server connections. In a turn a client sends its sync
    segments in chunks cut at random. Request-response: it reads every reply before sending
    its next segment. Pipelined: the router reads the server's replies only at some segment
    ends. Every byte a client sees must be what its own direct connection answered (failing and
    skipped Parses and Closes in a pipeline included), and after each turn the router's
    bookkeeping must match the servers."""
    sim = Simulation(max_prepared)
    for client_index, server, segments in turns:
        client = sim.clients[client_index]
        chunk = bytearray()
        for ops, end in segments:
            for _kind, _name, msg in ops:
                client.say_directly(msg)
                chunk += msg
                if data.draw(st.booleans(), label="cut after message"):
                    sim.send(client, server, bytes(chunk))
                    chunk.clear()
            client.say_directly(end)
            chunk += end
            if not pipelined or data.draw(st.booleans(), label="cut after segment"):
                sim.send(client, server, bytes(chunk))
                chunk.clear()
                if not pipelined or data.draw(st.booleans(), label="router reads replies"):
                    sim.deliver(client, server)
        if chunk:
            sim.send(client, server, bytes(chunk))
        sim.deliver(client, server)
        assert not client.linked  # the server connection is back in the pool
        client.assert_same_answers()
        sim.assert_settled()
        assert set(client.statements) == {name for name in client.direct.statements if name}


# --- Scripted sessions: errors mid-pipeline, a name prepared twice ------------------------------

A, B, C = (b"SELECT 'a'", ()), (b"SELECT 'b'", ()), (b"SELECT 'c'", ())


def reply(msg_type: bytes) -> tuple[bytes, bytes]:
    return (msg_type, b"")


def result(statement: tuple[bytes, tuple[int, ...]]) -> tuple[bytes, bytes]:
    """FakeServer's CommandComplete for a parameterless statement."""
    return (b"C", cstr(b"RESULT " + parse_body(*statement) + b"|"))


def run_scripted(*chunks: bytes, max_prepared: int = 250) -> SimClient:
    """One client, one server connection, request-response."""
    sim = Simulation(max_prepared, clients=1, servers=1)
    client = sim.run(0, 0, chunks)
    client.assert_same_answers()
    sim.assert_settled()
    return client


def test_scripted_session_matches_a_direct_connection():
    client = run_scripted(
        parse(b"a", *A) + parse(b"b", *B) + SYNC,
        describe(b"S", b"a") + bind(b"", b"a") + execute() + SYNC,
        bind(b"", b"zz") + parse(b"c", *C) + bind(b"", b"a") + SYNC,  # fails at the first Bind
        parse(b"c", *C) + bind(b"", b"c") + execute() + SYNC,
        close(b"S", b"a") + parse(b"a", *B) + bind(b"", b"a") + execute() + SYNC,
    )
    assert split(bytes(client.seen)) == [
        *[reply(b"1"), reply(b"1"), READY],
        *[(b"t", parse_body(*A)), reply(b"n"), reply(b"2"), result(A), READY],
        *[split(UNDEFINED_STATEMENT)[0], READY],
        *[reply(b"1"), reply(b"2"), result(C), READY],
        *[reply(b"3"), reply(b"1"), reply(b"2"), result(B), READY],
    ]


def test_eviction_close_skipped_after_an_error():
    """The Close evicting a is skipped: a stays prepared, and is not prepared again (42P05)."""
    run_scripted(
        parse(b"a", *A) + parse(b"b", *B) + SYNC,
        bind(b"", b"zz") + execute() + parse(b"c", *C) + SYNC,  # evicts a; all skipped
        bind(b"", b"a") + execute() + SYNC,
        max_prepared=2,
    )


def test_close_skipped_after_an_error():
    """A Close skipped after an error leaves the client's name in place."""
    run_scripted(
        parse(b"a", *A) + SYNC,
        bind(b"", b"zz") + close(b"S", b"a") + SYNC,
        bind(b"", b"a") + execute() + SYNC,
    )


def test_messages_sent_after_the_error_was_read_but_before_sync():
    """Messages sent into a segment whose error the router has read are queued for nothing."""
    run_scripted(
        bind(b"", b"zz") + FLUSH,  # PostgreSQL flushes an ErrorResponse at once
        parse(b"a", *A) + SYNC,  # skipped by the server
        parse(b"a", *A) + bind(b"", b"a") + execute() + SYNC,
    )


def test_pipelined_segment_relies_on_a_skipped_injected_parse():
    """An injected Parse that may yet be skipped is not relied on by later segments."""
    sim = Simulation(clients=1, servers=2)
    client = sim.run(0, 0, [parse(b"a", *A) + SYNC])  # prepared on server 0 only
    pipeline = bind(b"", b"zz") + bind(b"", b"a") + SYNC + bind(b"", b"a") + execute() + SYNC
    client.say_directly(pipeline)
    sim.send(client, 1, pipeline)  # on server 1, one chunk: no reply read in between
    sim.deliver(client, 1)
    client.assert_same_answers()


def test_pipelined_parse_of_a_failing_statement_twice():
    """A failing Parse never counts as prepared, even before its error is read."""
    sim = Simulation(clients=1, servers=1)
    client = sim.clients[0]
    pipeline = parse(b"a", *BAD_TEXT) + SYNC + parse(b"b", *BAD_TEXT) + SYNC
    client.say_directly(pipeline)
    sim.send(client, 0, pipeline)
    sim.deliver(client, 0)
    client.assert_same_answers()


def test_parse_of_an_existing_name():
    """42P05, as PostgreSQL; the name keeps its statement."""
    client = run_scripted(
        parse(b"a", *A) + SYNC,
        parse(b"a", *B) + SYNC,
        parse(b"a", *A) + bind(b"", b"a") + execute() + SYNC,  # the same text: 42P05 too
        bind(b"", b"a") + execute() + SYNC,
    )
    assert split(bytes(client.seen))[-3:] == [reply(b"2"), result(A), READY]


def test_parse_of_an_existing_name_reports_the_clients_name():
    """PostgreSQL's own 42P05 answers the stand-in Parse; it names the router's statement."""
    s = Session()
    s.rewrite(parse(b"mine", Q1) + SYNC)
    s.answered()
    s.server.sent_z = s.server.recv_z = 1
    name = s.name(Q1)
    out = s.rewrite(parse(b"mine", Q2) + SYNC)
    assert split(out) == split(parse(name, Q2) + close(b"S", name) + SYNC)
    assert (chr(s.server.ops[0][REPLY]), s.server.ops[0][ACTION]) == ("1", DUPLICATE)
    error = message(b"E", b"SERROR\0C42P05\0Mprepared statement \"" + name + b"\" already exists\0\0")
    assert router_replies(s.server, error) == message(
        b"E", b"SERROR\0C42P05\0Mprepared statement \"mine\" already exists\0\0"
    )
    assert list(s.server.ops) == []
    assert s.client[b"mine"].server_name == name
    assert list(s.server.prepared) == [name]


# --- A connection given up with replies unread or dropped (a replica's read retried elsewhere) ---


def _sent_and_given_up(s: Session, chunk: bytes, replies_read: int) -> None:
    """``chunk`` went to the server; the first ``replies_read`` Parse/Close replies were
    read with the server's FATAL and dropped (ServerConnection._retry_elsewhere), then the
    connection was lost (ClientConnection.server_lost)."""
    s.server.sent_z = s.server.recv_z
    s.rewrite(chunk)
    answered = []
    for _ in range(replies_read):
        op = s.server.ops.popleft()
        if op[ACTION] == DUPLICATE:
            s.server.commit_duplicate(op)
        answered.append(op)
    s.server.unanswer(answered)
    s.server.abandon()
    assert list(s.server.ops) == []


@pytest.mark.parametrize("replies_read", [0, 1])
def test_a_parse_on_a_connection_given_up_leaves_the_name_free(replies_read):
    s = Session()
    _sent_and_given_up(s, parse(b"s1", Q1) + FLUSH, replies_read)
    assert s.client == {}
    # Sent again elsewhere, it is a first Parse of the name, not a second.
    s.server = s.new_server()
    out = s.rewrite(parse(b"s1", Q1) + FLUSH)
    assert split(out) == split(parse(s.name(Q1), Q1) + FLUSH)


@pytest.mark.parametrize("replies_read", [0, 1])
def test_a_stand_in_noop_close_on_a_connection_given_up_leaves_the_name_free(replies_read):
    s = Session()
    s.rewrite(parse(b"other", Q1) + SYNC, client={})
    s.answered()
    _sent_and_given_up(s, parse(b"s1", Q1) + FLUSH, replies_read)
    assert s.client == {}


@pytest.mark.parametrize(
    "chunk",
    [
        # The stand-in Parse succeeds when the server no longer has the statement: the
        # client's name then means the new text, until the reply is dropped.
        parse(b"s1", Q2) + FLUSH,
        close(b"S", b"s1") + FLUSH,
    ],
    ids=["second parse", "close"],
)
@pytest.mark.parametrize("replies_read", [0, 1])
def test_a_parse_or_close_of_a_name_on_a_connection_given_up_leaves_it(chunk, replies_read):
    s = Session()
    s.rewrite(parse(b"s1", Q1) + SYNC)
    s.answered()
    first = s.client[b"s1"]
    _sent_and_given_up(s, chunk, replies_read)
    assert s.client == {b"s1": first}


def test_bind_of_a_statement_whose_parse_was_skipped():
    """A named Parse skipped after an error gives the client no name (26000 on its Bind)."""
    run_scripted(bind(b"", b"zz") + parse(b"a", *A) + SYNC, bind(b"", b"a") + execute() + SYNC)


def run_pipelined(setup: bytes, *segments: bytes) -> SimClient:
    """One client, two server connections: ``setup`` request-response on server 0, then the
    segments in one write on server 1, then each segment again on server 0."""
    sim = Simulation(clients=1, servers=2)
    client = sim.run(0, 0, [setup] if setup else [])
    data = b"".join(segments)
    client.say_directly(data)
    sim.send(client, 1, data)
    sim.deliver(client, 1)
    client.assert_same_answers()
    sim.run(0, 0, segments)
    client.assert_same_answers()
    sim.assert_settled()
    return client


def test_pipelined_parse_of_a_name_whose_earlier_parse_failed():
    """The failed Parse never created a: the next segment's Parse of it succeeds, and a means
    that statement from then on."""
    client = run_pipelined(
        b"",
        parse(b"a", *BAD_TEXT) + SYNC,
        parse(b"a", *A) + bind(b"", b"a") + execute() + SYNC,
        bind(b"", b"a") + execute() + SYNC,
    )
    assert split(bytes(client.seen))[:9] == [
        *[split(SYNTAX_ERROR)[0], READY],
        *[reply(b"1"), reply(b"2"), result(A), READY],
        *[reply(b"2"), result(A), READY],
    ]


@pytest.mark.parametrize("skipped", [True, False], ids=["close-skipped", "close-done"])
def test_pipelined_use_of_a_name_after_its_close(skipped):
    """A Close skipped after an error never happened: a still exists in later segments."""
    client = run_pipelined(
        parse(b"a", *A) + SYNC,
        (bind(b"", b"zz") if skipped else b"") + close(b"S", b"a") + SYNC,
        bind(b"", b"a") + execute() + SYNC,
        parse(b"a", *B) + SYNC,
        describe(b"S", b"a") + SYNC,
    )
    kinds = b"".join(t for t, _ in split(bytes(client.seen)))
    assert kinds.startswith(b"1Z" + (b"EZ2CZEZtnZ" if skipped else b"3ZEZ1ZtnZ"))


# --- Re-prepare after DDL (the sans-I/O parts) ---------------------------------------------------


def test_statements_used_names_the_statements_of_binds_and_describes():
    data = pipeline(
        parse(b"", Q1), bind(b"", b""), bind(b"p", b"pgr_1"), describe(b"S", b"pgr_2"),
        describe(b"P", b"p"), execute(b"p"), close(b"S", b"pgr_3"), SYNC,
    )
    assert statements_used(data) == [b"pgr_1", b"pgr_2"]


def test_retired_statement_text_gets_a_fresh_name_and_is_not_answered_locally():
    s = Session()
    s.rewrite(parse(b"s1", Q1) + parse(b"s2", Q2) + SYNC)
    s.answered()
    stale, other = s.name(Q1), s.name(Q2)
    s.registry.retire(stale)
    fresh = s.registry.name_for(parse_body(Q1))
    assert fresh not in (stale, other) and s.name(Q2) == other
    assert stale not in s.registry.validated and other in s.registry.validated
    assert local_parse_reply(parse(b"again", Q1) + SYNC, 0, s.client, s.registry) is None
    assert s.client[b"s1"].server_name == stale  # the client's statement keeps its name


def test_unprepared_statement_is_closed_then_parsed_again_for_its_next_use():
    """What the rerun of an exchange sends after "cached plan must not change result type"."""
    s = Session()
    s.rewrite(parse(b"s1", Q1) + SYNC)
    s.answered()
    s.server.sent_z = s.server.recv_z = 1
    name = s.name(Q1)
    out: list[bytes] = []
    s.server.unprepare(name, 1, out)
    out.append(s.rewrite(bind(b"", b"s1") + describe(b"P", b"") + execute() + SYNC))
    assert split(b"".join(out)) == split(
        close(b"S", name) + parse(name, Q1) + bind(b"", name) + describe(b"P", b"") + execute() + SYNC
    )
    assert close_q(s.server) == [(1, SWALLOW)]
    assert parse_q(s.server) == [(1, SWALLOW, name)]


@pytest.mark.parametrize(
    ("data", "rerun"),
    [
        pytest.param(bind(b"", b"s") + describe(b"P", b"") + execute() + SYNC, True, id="libpq"),
        pytest.param(describe(b"S", b"s") + bind(b"", b"s") + execute() + SYNC, True, id="describe-statement"),
        pytest.param(bind(b"", b"s") + execute() + SYNC, False, id="asyncpg"),
        pytest.param(bind(b"", b"s") + execute() + describe(b"P", b"") + SYNC, False, id="describe-after"),
        pytest.param(bind(b"", b"s") + describe(b"P", b"") + execute(), False, id="no-sync"),
        pytest.param(bind(b"", b"s") + describe(b"P", b"") + execute() + SYNC[:3], False, id="partial"),
    ],
)
def test_an_exchange_reruns_only_when_it_describes_before_it_executes(data, rerun):
    from router.frontend.client import _describes_before_execute

    assert _describes_before_execute(data) is rerun


def test_after_discard_all_a_dropped_close_puts_nothing_back():
    s = Session(max_prepared=1)
    s.rewrite(parse(b"a", Q1) + SYNC)
    s.answered()
    s.server.sent_z = s.server.recv_z = 1
    s.rewrite(bind(b"", b"zz") + parse(b"b", Q2) + SYNC + query(b"DISCARD ALL"))  # evicts a
    s.server.sent_z = 3
    s.server.forget_all()
    s.server.on_error()  # the Bind fails: the eviction's Close and b's Parse are skipped
    assert list(s.server.prepared) == []  # DISCARD ALL drops a all the same


def _s1_prepared() -> Session:
    """A session whose client has prepared s1 (Q1) on the server, all answered."""
    s = Session()
    s.rewrite(parse(b"s1", Q1) + SYNC)
    s.answered()
    s.server.sent_z = s.server.recv_z = 1
    return s


def test_after_a_discard_all_a_statement_is_closed_before_it_is_prepared_again():
    """DISCARD ALL fails in a transaction block: the server may still have the statements,
    so their next use closes first (a Parse of a name the server has fails with 42P05)."""
    s = _s1_prepared()
    name = s.name(Q1)
    s.server.forget_all()
    out = s.rewrite(bind(b"", b"s1") + execute() + SYNC)
    expected = parse(name, Q1) + bind(b"", name) + execute() + SYNC
    assert split(out) == split(close(b"S", name) + expected)
    # Closed once: after that the server's state is known again.
    s.answered()
    s.server.sent_z = s.server.recv_z = 2
    assert split(s.rewrite(bind(b"", b"s1") + execute() + SYNC)) == split(bind(b"", name) + execute() + SYNC)


# --- DISCARD ALL / DEALLOCATE ALL in a pipeline ------------------------------------------------


def test_a_name_behind_a_discard_all_waits_for_its_reply():
    """DEALLOCATE ALL, then a Parse of s1 in the same write: whether the client's names are
    freed is known from the reply, so the Parse waits (and is rewritten knowing it)."""
    s = _s1_prepared()
    data = query(b"SELECT 1") + parse(b"s2", Q2) + SYNC + query(b"DEALLOCATE ALL") + parse(b"s1", Q1) + SYNC
    out = s.rewrite(data, forgets=lambda sql: sql == b"DEALLOCATE ALL")
    # Up to the DEALLOCATE ALL, not further: s2 is prepared before it and forgotten with s1.
    assert split(out) == split(query(b"SELECT 1") + parse(s.name(Q2), Q2) + SYNC + query(b"DEALLOCATE ALL"))
    assert s.server.wait_from == len(data) - len(parse(b"s1", Q1) + SYNC)
    assert s.server.unsure == {s.name(Q1), s.name(Q2)}
    # A later write naming a statement waits too, until the reply has come.
    s.server.sent_z = 4  # the three Queries and the Sync sent
    assert s.rewrite(bind(b"", b"s1") + execute() + SYNC) == b""
    assert s.server.wait_from == 0


def test_a_name_in_the_segment_of_an_execute_that_may_discard_goes_at_once():
    """An Execute may run DEALLOCATE ALL: a message naming a statement after it in the same
    segment cannot wait (no reply comes before the Sync); after the Sync it waits."""
    s = Session()
    data = parse(b"", b"DEALLOCATE ALL") + bind(b"", b"") + execute() + parse(b"s1", Q1) + SYNC + describe(b"S", b"s1")
    out = s.rewrite(data, forgets=lambda sql: False)
    assert split(out)[-1] == (b"S", b"")
    assert b"s1" in s.client
    assert s.server.wait_from == len(data) - len(describe(b"S", b"s1"))


@pytest.mark.parametrize("again", [False, True], ids=["one-discard", "discard-behind"])
def test_a_request_dropped_after_a_discard_all_leaves_its_statement_unsure(again):
    """A Close and Parse of an unsure statement (DISCARD ALL sent), dropped after an error,
    leave it unsure, not absent: the server may still have it, and a Parse of it there would
    fail with 42P05. So do requests queued before another DISCARD ALL (discard-behind), even
    when a later use in the same segment has closed the statement again."""
    s = _s1_prepared()
    name = s.name(Q1)
    s.server.forget_all()
    s.rewrite(bind(b"zz", b"s1") + execute(b"zz"))
    assert close_q(s.server) == [(1, SWALLOW)]
    if again:
        s.server.forget_all()
        s.rewrite(bind(b"yy", b"s1") + execute(b"yy"))  # closes and parses it again
        assert close_q(s.server) == [(1, SWALLOW), (1, SWALLOW)]
    s.rewrite(SYNC)
    s.server.sent_z = 2
    s.server.on_error()  # the first Bind fails: every Close and Parse after it is skipped
    s.server.recv_z = 2
    assert name not in s.server.prepared and name in s.server.unsure
    out = s.rewrite(bind(b"", b"s1") + execute() + SYNC)
    assert split(out)[:2] == split(close(b"S", name) + parse(name, Q1))


@pytest.mark.parametrize(
    ("before", "failed", "noop"),
    [
        pytest.param(b"", False, True, id="first-segment"),
        pytest.param(b"", True, False, id="failed-transaction"),
        pytest.param(query(b"SELECT 1/0"), False, False, id="behind-a-query"),
    ],
)
def test_a_parse_the_server_has_is_a_no_op_only_where_nothing_can_have_failed(before, failed, noop):
    """In a failed transaction a Parse fails (25P02) and a Close does not: the no-op Close
    stands in for a Parse only where no earlier reply is owed and the transaction is sound."""
    s = Session()
    s.rewrite(parse(b"a", Q1) + SYNC)
    s.answered()
    s.server.sent_z = s.server.recv_z = 1
    name = s.name(Q1)
    out = s.rewrite(before + parse(b"b", Q1) + SYNC, failed=failed)
    sent = split(out)[len(split(before)):]
    if noop:
        assert sent == split(close(b"S", NOOP_NAME) + SYNC)
    else:
        assert sent == split(close(b"S", name) + parse(name, Q1) + SYNC)


def test_an_error_names_the_clients_statement_as_it_was_where_the_error_struck():
    s = _s1_prepared()
    name = s.name(Q1)
    s.rewrite(bind(b"", b"s1", [b"3"]) + execute() + SYNC + close(b"S", b"s1") + SYNC)
    assert b"s1" not in s.client  # the Close of the later segment has taken it already
    error = frame(b"E", b"SERROR\0C08P01\0Mbind message supplies 1 parameters, but prepared statement \"%s\" requires 0\0\0" % name)
    s.server.on_error()
    renamed = client_names_in_error(error, s.client, s.server.ops)
    assert b'statement "s1" requires' in renamed
    assert client_names_in_error(frame(b"E", b"SERROR\0C22012\0Mdivision by zero\0\0"), s.client, s.server.ops) == frame(
        b"E", b"SERROR\0C22012\0Mdivision by zero\0\0"
    )


def test_the_tag_of_a_discard_all_frees_the_names_as_they_are_once_it_ran():
    """The tag comes after the replies to everything sent before the discard: a Close the
    server skipped after an error has been put back, and the name is freed all the same."""
    s = Session()
    data = parse(b"s1", Q1) + parse(b"s1", Q1) + close(b"S", b"s1") + SYNC + query(b"DISCARD ALL")
    s.rewrite(data, forgets=lambda sql: sql == b"DISCARD ALL")
    assert b"s1" not in s.client  # the Close, as sent
    s.server.ops.popleft()  # ParseComplete of the first Parse; the second fails (42P05)
    s.server.on_error()
    assert b"s1" in s.client  # the Close was skipped
    s.server.recv_z = 1
    assert s.server.forget_client_names(s.client) == [b"s1"]
    assert s.client == {}


def test_a_name_parsed_behind_the_discard_all_outlives_its_tag():
    """s1 was prepared before the discard and closed and parsed again behind it: the tag
    leaves it; had those requests failed, s1 is gone (the discard freed it), not back."""
    s = _s1_prepared()
    data = (parse(b"", b"DEALLOCATE ALL") + bind(b"", b"") + execute() + close(b"S", b"s1")
            + parse(b"s1", Q2) + SYNC)
    s.rewrite(data, forgets=lambda sql: False)
    s.server.ops.popleft()  # ParseComplete of the unnamed Parse
    assert s.server.forget_client_names(s.client) == []
    assert list(s.client) == [b"s1"]
    s.server.on_error()  # s1's Close and Parse are skipped
    assert s.client == {}


def test_the_registry_forgets_the_least_recently_prepared_text() -> None:
    """Bounded: clients that prepare ever new texts do not grow the router without end. A
    forgotten text gets a new name when prepared again (names are never reused), and stops
    being answered without a server."""
    registry = StatementRegistry(maxsize=2)
    a, b = registry.name_for(b"SELECT 1\0\0\0"), registry.name_for(b"SELECT 2\0\0\0")
    registry.validated.update({a, b})
    assert registry.name_for(b"SELECT 1\0\0\0") == a  # recently used again: b is the oldest
    c = registry.name_for(b"SELECT 3\0\0\0")
    assert len(registry) == 2 and b not in registry.validated and a in registry.validated
    assert registry.name_for(b"SELECT 1\0\0\0") == a
    b2 = registry.name_for(b"SELECT 2\0\0\0")
    assert b2 not in {a, b, c}
    assert local_parse_reply(parse(b"s1", b"SELECT 2") + SYNC, 0, {}, registry, b"I") is None
    # And in bytes of text: here 20, two of these texts.
    registry = StatementRegistry(maxsize=100, max_bytes=20)
    first = registry.name_for(b"SELECT 10\0")
    registry.name_for(b"SELECT 20\0")
    assert len(registry) == 2
    registry.name_for(b"SELECT 30\0")
    assert len(registry) == 2 and registry.name_for(b"SELECT 10\0") != first
    # A text longer than the whole budget is named all the same, and is the one remembered.
    long = registry.name_for(b"x" * 50)
    assert len(registry) == 1 and registry.name_for(b"x" * 50) == long
