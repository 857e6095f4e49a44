"""Property tests: the sans-I/O codec, fed arbitrary bytes, either returns a value or raises
ProtocolError (ValueError where the function documents it). Nothing else may escape, since
the frontend turns exactly ProtocolError into an ErrorResponse (principle 7 of STYLE.md)."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from router.protocol import messages as m
from router.protocol.auth import (
    SCRAM_SHA_256,
    AuthFailed,
    ScramClientExchange,
    ScramServerExchange,
    ScramVerifier,
    scram_verifier,
)
from router.protocol.errors import ProtocolError
from router.protocol.framing import HEADER_SIZE, MessageReader, frame
from router.protocol.startup import (
    MAX_STARTUP_PACKET,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    build_cancel_request,
    build_startup_message,
    parse_startup_packet,
    startup_packet_length,
)

# Two cores in CI: no per-example deadline, no example database written into the repository.
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

CODES = st.sampled_from(
    [0x0003_0000, 0x0003_0001, 0x0002_0000, 80877103, 80877104, 80877102]
) | st.integers(0, 0xFFFFFFFF)

# Text that can go into a C string.
CSTR = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20
)


def cuts(data: bytes):
    """Every proper prefix of ``data``."""
    return (data[:k] for k in range(len(data)))


# --- Startup ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_parse_startup_packet_random_bytes(data):
    try:
        result = parse_startup_packet(data)
    except ProtocolError:
        return
    assert isinstance(result, SSLRequest | GSSENCRequest | CancelRequest | StartupMessage)
    assert len(data) >= 8


@FUZZ
@given(CODES, st.binary(max_size=120))
def test_parse_startup_packet_well_framed_random_body(code, body):
    data = struct.pack("!II", 8 + len(body), code) + body
    try:
        result = parse_startup_packet(data)
    except ProtocolError as exc:
        assert exc.sqlstate in ("08P01", "0A000")
        return
    if isinstance(result, StartupMessage):
        assert result.major == 3
        assert all(name for name in result.params)
        assert body.endswith(b"\x00")


@FUZZ
@given(st.dictionaries(CSTR.filter(bool), CSTR, max_size=6))
def test_startup_message_round_trip_and_truncations(params):
    data = build_startup_message(params)
    msg = parse_startup_packet(data)
    assert isinstance(msg, StartupMessage)
    assert msg.params == params
    for prefix in cuts(data):
        try:
            parse_startup_packet(prefix)
        except ProtocolError:
            continue
        raise AssertionError(f"truncated packet {prefix!r} was accepted")


@FUZZ
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_cancel_request_round_trip_and_truncations(pid, key):
    data = build_cancel_request(pid, key)
    assert parse_startup_packet(data) == CancelRequest(pid, key)
    for prefix in cuts(data):
        try:
            parse_startup_packet(prefix)
        except ProtocolError:
            continue
        raise AssertionError(f"truncated packet {prefix!r} was accepted")


@FUZZ
@given(st.binary(max_size=12))
def test_startup_packet_length_random(data):
    try:
        length = startup_packet_length(data)
    except ProtocolError as exc:
        assert exc.sqlstate == "08P01"
        declared = struct.unpack_from("!I", data)[0]
        assert declared < 8 or declared > MAX_STARTUP_PACKET
        return
    if len(data) < 4:
        assert length is None
    else:
        assert length == struct.unpack_from("!I", data)[0]
        assert 8 <= length <= MAX_STARTUP_PACKET


# --- Message parsers -------------------------------------------------------------------------

PARSERS = [
    m.parse_error_fields,
    m.parse_authentication,
    m.parse_sasl_mechanisms,
    m.parse_password_message,
    m.parse_sasl_initial_response,
    m.parse_parameter_status,
    m.parse_backend_key_data,
    m.parse_ready_for_query,
    m.parse_negotiate_protocol_version,
    m.parse_query,
    m.parse_row_description,
    m.parse_data_row,
]


def test_every_parser_is_fuzzed():
    public = {name for name in dir(m) if name.startswith("parse_")}
    assert public == {p.__name__ for p in PARSERS}


@FUZZ
@given(st.sampled_from(PARSERS), st.binary(max_size=200))
def test_parsers_random_bytes(parse, body):
    try:
        parse(body)
    except ProtocolError as exc:
        assert exc.sqlstate == "08P01"


def body(message: bytes) -> bytes:
    return message[HEADER_SIZE:]


def mechanisms_of(auth_sasl_body: bytes) -> list[str]:
    return m.parse_sasl_mechanisms(m.parse_authentication(auth_sasl_body)[1])


# (parser, body of a message built by the matching builder)
VALID_BODIES = st.one_of(
    st.builds(m.error_response, CSTR, CSTR, detail=CSTR, hint=CSTR).map(
        lambda msg: (m.parse_error_fields, body(msg))
    ),
    st.builds(m.notice_response, CSTR, CSTR).map(lambda msg: (m.parse_error_fields, body(msg))),
    st.binary(min_size=4, max_size=4).map(lambda s: (m.parse_authentication, body(m.auth_md5(s)))),
    st.lists(CSTR.filter(bool), max_size=4).map(lambda ms: (mechanisms_of, body(m.auth_sasl(ms)))),
    st.binary(max_size=30)
    .filter(lambda p: b"\0" not in p)
    .map(lambda p: (m.parse_password_message, body(m.password_message(p)))),
    st.builds(m.sasl_initial_response, CSTR, st.binary(max_size=30)).map(
        lambda msg: (m.parse_sasl_initial_response, body(msg))
    ),
    st.builds(m.parameter_status, CSTR, CSTR).map(
        lambda msg: (m.parse_parameter_status, body(msg))
    ),
    st.builds(m.backend_key_data, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(
        lambda msg: (m.parse_backend_key_data, body(msg))
    ),
    st.builds(
        m.negotiate_protocol_version, st.integers(0, 2**32 - 1), st.lists(CSTR, max_size=4)
    ).map(lambda msg: (m.parse_negotiate_protocol_version, body(msg))),
    st.builds(m.query, CSTR).map(lambda msg: (m.parse_query, body(msg))),
    st.builds(m.row_description, st.lists(CSTR, max_size=4)).map(
        lambda msg: (m.parse_row_description, body(msg))
    ),
    st.builds(m.data_row, st.lists(st.one_of(st.none(), st.text(max_size=20)), max_size=4)).map(
        lambda msg: (m.parse_data_row, body(msg))
    ),
)


@FUZZ
@given(st.lists(CSTR, max_size=4), st.lists(st.one_of(st.none(), st.text(max_size=20)), max_size=4))
def test_result_messages_round_trip(names, values):
    fields = m.parse_row_description(body(m.row_description(names)))
    assert [f[0] for f in fields] == names
    assert {f[1:] for f in fields} <= {(0, 0, m.TEXT_OID, -1, -1, 0)}
    assert m.parse_data_row(body(m.data_row(values))) == [v if v is None else v.encode() for v in values]


@FUZZ
@given(VALID_BODIES, st.data())
def test_parsers_on_truncated_and_mutated_valid_bodies(case, data):
    parse, valid = case
    parse(valid)  # the untouched body parses
    for prefix in cuts(valid):
        try:
            parse(prefix)
        except ProtocolError:
            pass
    if valid:
        i = data.draw(st.integers(0, len(valid) - 1))
        mutated = valid[:i] + bytes([data.draw(st.integers(0, 255))]) + valid[i + 1 :]
        try:
            parse(mutated)
        except ProtocolError:
            pass


# --- MessageReader ---------------------------------------------------------------------------

MESSAGES = st.lists(
    st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=40)), max_size=8
)


def chunked(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@FUZZ
@given(MESSAGES, st.lists(st.integers(0, 10_000), max_size=20))
def test_reader_reassembles_any_chunking(messages, points):
    stream = b"".join(frame(t, b) for t, b in messages)
    reader = MessageReader()
    got = []
    for chunk in chunked(stream, points):
        reader.feed(chunk)
        for _ in range(len(stream) // HEADER_SIZE + 1):
            msg = reader.next()
            if msg is None:
                break
            got.append(msg)
        else:
            raise AssertionError("MessageReader.next() did not stop")
    assert got == messages
    assert len(reader) == 0


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 10_000), max_size=10), st.integers(4, 400))
def test_reader_random_stream_makes_progress(stream, points, max_size):
    reader = MessageReader(max_size=max_size)
    consumed = 0
    try:
        for chunk in chunked(stream, points):
            reader.feed(chunk)
            for _ in range(len(stream) // HEADER_SIZE + 1):
                before = len(reader)
                msg = reader.next()
                if msg is None:
                    assert len(reader) == before
                    break
                msg_type, body = msg
                taken = before - len(reader)
                assert taken >= HEADER_SIZE
                assert taken == HEADER_SIZE + len(body)
                assert len(msg_type) == 1
                assert HEADER_SIZE + len(body) - 1 <= max_size
                consumed += taken
            else:
                raise AssertionError("MessageReader.next() did not stop")
    except ProtocolError as exc:
        assert exc.sqlstate in ("08P01", "54000")
        return
    assert consumed + len(reader) == len(stream)
    assert reader.take_rest() == stream[consumed:]


# --- SCRAM -----------------------------------------------------------------------------------

VERIFIER = ScramVerifier.parse(scram_verifier("fuzz"))

# Mostly well-shaped SCRAM attribute soup, so that scramp's parser gets past its first check.
SCRAM_TEXT = st.lists(
    st.sampled_from(
        [
            "n",
            "y",
            "p=tls-server-end-point",
            "",
            "a=x",
            "n=u",
            "n=",
            "r=abc",
            "m=x",
            "c=biws",
            "p=AAAA",
            "r=",
            "=",
            "n=a=2C",
            "n=a=3D",
            "s=QUJD",
            "i=4096",
            "\u00e9",
        ]
    )
    | st.text(max_size=8),
    max_size=6,
).map(",".join)


@FUZZ
@given(st.binary(max_size=120) | SCRAM_TEXT.map(str.encode))
def test_scram_server_first_random(client_first):
    try:
        server_first = ScramServerExchange(VERIFIER).first(client_first)
    except ProtocolError as exc:
        assert exc.sqlstate == "08P01"
        return
    assert server_first.startswith(b"r=")


@FUZZ
@given(st.binary(max_size=120) | SCRAM_TEXT.map(str.encode))
def test_scram_server_final_random(client_final):
    server = ScramServerExchange(VERIFIER)
    server.first(b"n,,n=*,r=fuzznonce")
    try:
        server.final(client_final)
    except (ProtocolError, AuthFailed):
        return
    raise AssertionError(f"random client-final {client_final!r} authenticated")


@FUZZ
@given(
    st.text(max_size=120)
    | st.builds(lambda a, b: f"SCRAM-SHA-256${a}${b}", st.text(max_size=30), st.text(max_size=30))
)
def test_scram_verifier_parse_random(text):
    try:
        verifier = ScramVerifier.parse(text)
    except ValueError:
        return
    assert str(ScramVerifier.parse(str(verifier))) == str(verifier)


@FUZZ
@given(SCRAM_TEXT, st.integers(4096, 4200), st.booleans())
def test_scram_client_final_random_utf8(text, iterations, own_nonce):
    # UTF-8 only here; non-UTF-8 server messages are covered in test_auth.py
    client = ScramClientExchange([SCRAM_SHA_256], "alice", "pw")
    nonce = client.first().decode().split(",r=")[1]
    # Half the time keep the client's nonce so scramp reaches the salt and iteration checks.
    server_first = (
        f"r={nonce}x,s=QUJDREVGR0hJSktMTU5PUA==,i={iterations},{text}" if own_nonce else text
    )
    assume(server_first)
    try:
        client.final(server_first.encode())
    except ProtocolError:
        pass
