"""Message builders and parsers (PostgreSQL docs, 55.7 "Message Formats", 55.8 "Error and
Notice Message Fields") and the MessageReader framing."""

from __future__ import annotations

import struct

import pytest

from router.protocol import messages as m
from router.protocol.errors import ProtocolError
from router.protocol.framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    MessageReader,
    frame,
    read_length,
)


def split(message: bytes) -> tuple[bytes, bytes]:
    """(type, body) of one whole typed message, checking its length field on the way."""
    (length,) = struct.unpack_from("!I", message, 1)
    assert length == len(message) - 1, "length field must count itself and the body"
    return message[:1], message[5:]


# --- Exact bytes -----------------------------------------------------------------------------

EXACT = [
    pytest.param(m.ready_for_query(ord("I")), b"Z\x00\x00\x00\x05I", id="ready_for_query-idle"),
    pytest.param(m.ready_for_query(), b"Z\x00\x00\x00\x05I", id="ready_for_query-default-idle"),
    pytest.param(
        m.ready_for_query(m.IN_TRANSACTION), b"Z\x00\x00\x00\x05T", id="ready_for_query-T"
    ),
    pytest.param(
        m.ready_for_query(m.FAILED_TRANSACTION), b"Z\x00\x00\x00\x05E", id="ready_for_query-E"
    ),
    pytest.param(m.auth_ok(), b"R\x00\x00\x00\x08\x00\x00\x00\x00", id="auth_ok"),
    pytest.param(m.auth_cleartext(), b"R\x00\x00\x00\x08\x00\x00\x00\x03", id="auth_cleartext"),
    pytest.param(
        m.auth_md5(b"\x01\x02\x03\x04"),
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04",
        id="auth_md5",
    ),
    pytest.param(
        m.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
        b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00",
        id="auth_sasl",
    ),
    pytest.param(
        m.auth_sasl_continue(b"r=abc"),
        b"R\x00\x00\x00\x0d\x00\x00\x00\x0br=abc",
        id="auth_sasl_continue",
    ),
    pytest.param(
        m.auth_sasl_final(b"v=xyz"),
        b"R\x00\x00\x00\x0d\x00\x00\x00\x0cv=xyz",
        id="auth_sasl_final",
    ),
    pytest.param(
        m.parameter_status("client_encoding", "UTF8"),
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00",
        id="parameter_status",
    ),
    pytest.param(
        m.backend_key_data(1234, 5678),
        b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x00\x00\x16\x2e",
        id="backend_key_data",
    ),
    pytest.param(
        m.negotiate_protocol_version(0, ["_pq_.x"]),
        b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00",
        id="negotiate_protocol_version",
    ),
    pytest.param(m.query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00", id="query"),
    pytest.param(m.terminate(), b"X\x00\x00\x00\x04", id="terminate"),
    pytest.param(m.sync(), b"S\x00\x00\x00\x04", id="sync"),
    pytest.param(m.password_message(b"secret"), b"p\x00\x00\x00\x0bsecret\x00", id="password"),
    pytest.param(
        m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x"),
        b"p\x00\x00\x00\x1fSCRAM-SHA-256\x00\x00\x00\x00\x09n,,n=,r=x",
        id="sasl_initial_response",
    ),
    pytest.param(m.sasl_response(b"c=biws"), b"p\x00\x00\x00\x0ac=biws", id="sasl_response"),
    pytest.param(
        m.error_response("28P01", "bad password", severity="FATAL"),
        b"E\x00\x00\x00\x28SFATAL\x00VFATAL\x00C28P01\x00Mbad password\x00\x00",
        id="error_response",
    ),
    pytest.param(
        m.notice_response("01000", "hi"),
        b"N\x00\x00\x00\x20SNOTICE\x00VNOTICE\x00C01000\x00Mhi\x00\x00",
        id="notice_response",
    ),
    pytest.param(
        m.row_description(["pgrouter.target"]),
        b"T\x00\x00\x00\x28\x00\x01pgrouter.target\x00"
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00",
        id="row_description-text-column",  # as PostgreSQL describes SHOW's
    ),
    pytest.param(m.data_row(["auto"]), b"D\x00\x00\x00\x0e\x00\x01\x00\x00\x00\x04auto", id="data_row"),
    pytest.param(m.data_row([None, ""]), b"D\x00\x00\x00\x0e\x00\x02\xff\xff\xff\xff\x00\x00\x00\x00", id="data_row-null-empty"),
    pytest.param(m.command_complete("SHOW"), b"C\x00\x00\x00\x09SHOW\x00", id="command_complete"),
    pytest.param(m.empty_query_response(), b"I\x00\x00\x00\x04", id="empty_query_response"),
    pytest.param(frame(b"D"), b"D\x00\x00\x00\x04", id="frame-empty-body"),
    pytest.param(frame(b"d", b"\x00\x01"), b"d\x00\x00\x00\x06\x00\x01", id="frame-with-body"),
]


@pytest.mark.parametrize(("built", "expected"), EXACT)
def test_exact_bytes(built, expected):
    assert built == expected


def test_read_length():
    data = b"xxQ\x00\x00\x01\x00"
    assert read_length(data, 3) == 256
    assert read_length(memoryview(b"\xff\xff\xff\xff"), 0) == 0xFFFFFFFF


# --- ErrorResponse / NoticeResponse fields ------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(
            {"sqlstate": "57P01", "message": "terminating connection"},
            {"S": "ERROR", "V": "ERROR", "C": "57P01", "M": "terminating connection"},
            id="defaults",
        ),
        pytest.param(
            {
                "sqlstate": "53300",
                "message": "too many clients for tenant \u00ab7\u00bb",
                "severity": "FATAL",
                "detail": "pool size is 20",
                "hint": "retry later",
            },
            {
                "S": "FATAL",
                "V": "FATAL",
                "C": "53300",
                "M": "too many clients for tenant \u00ab7\u00bb",
                "D": "pool size is 20",
                "H": "retry later",
            },
            id="all-fields",
        ),
        pytest.param(
            {"sqlstate": "25006", "message": "read-only", "hint": "use the primary"},
            {"S": "ERROR", "V": "ERROR", "C": "25006", "M": "read-only", "H": "use the primary"},
            id="hint-without-detail",
        ),
    ],
)
def test_error_response_fields(kwargs, expected):
    msg_type, body = split(m.error_response(**kwargs))
    assert msg_type == b"E"
    fields = m.parse_error_fields(body)
    assert fields == expected
    # 55.8: fields in this order, as PostgreSQL sends them.
    assert list(fields) == list(expected)


def test_notice_response_fields():
    msg_type, body = split(m.notice_response("01000", "pool is warming up", severity="WARNING"))
    assert msg_type == b"N"
    assert m.parse_error_fields(body) == {
        "S": "WARNING",
        "V": "WARNING",
        "C": "01000",
        "M": "pool is warming up",
    }


def test_parse_error_fields_from_postgresql():
    # An ErrorResponse body as PostgreSQL 16 sends it, with fields the router does not build.
    body = (
        b'SERROR\x00VERROR\x00C42P01\x00Mrelation "nope" does not exist\x00'
        b"P15\x00Fparse_relation.c\x00L1392\x00RparserOpenTable\x00\x00"
    )
    assert m.parse_error_fields(body) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42P01",
        "M": 'relation "nope" does not exist',
        "P": "15",
        "F": "parse_relation.c",
        "L": "1392",
        "R": "parserOpenTable",
    }


def test_parse_error_fields_empty():
    assert m.parse_error_fields(b"\x00") == {}


# --- Round trips -----------------------------------------------------------------------------


def _auth(message: bytes) -> tuple[int, bytes]:
    msg_type, body = split(message)
    assert msg_type == b"R"
    return m.parse_authentication(body)


ROUND_TRIPS = [
    pytest.param(lambda: _auth(m.auth_ok()), (0, b""), id="auth_ok"),
    pytest.param(lambda: _auth(m.auth_cleartext()), (3, b""), id="auth_cleartext"),
    pytest.param(
        lambda: _auth(m.auth_md5(b"\xff\x00\x10\x7f")), (5, b"\xff\x00\x10\x7f"), id="auth_md5"
    ),
    pytest.param(
        lambda: _auth(m.auth_sasl_continue(b"r=n,s=c,i=4096")),
        (11, b"r=n,s=c,i=4096"),
        id="auth_sasl_continue",
    ),
    pytest.param(lambda: _auth(m.auth_sasl_final(b"v=sig")), (12, b"v=sig"), id="auth_sasl_final"),
    pytest.param(
        lambda: m.parse_sasl_mechanisms(
            _auth(m.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))[1]
        ),
        ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"],
        id="auth_sasl-mechanisms",
    ),
    pytest.param(
        lambda: m.parse_sasl_mechanisms(_auth(m.auth_sasl([]))[1]), [], id="auth_sasl-no-mechanisms"
    ),
    pytest.param(lambda: _auth(m.auth_sasl(["X"]))[0], m.AUTH_SASL, id="auth_sasl-code"),
    pytest.param(
        lambda: m.parse_password_message(split(m.password_message(b"md5abcdef"))[1]),
        b"md5abcdef",
        id="password_message",
    ),
    pytest.param(
        lambda: m.parse_password_message(split(m.password_message(b""))[1]),
        b"",
        id="password_message-empty",
    ),
    pytest.param(
        lambda: m.parse_sasl_initial_response(
            split(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))[1]
        ),
        ("SCRAM-SHA-256", b"n,,n=,r=abc"),
        id="sasl_initial_response",
    ),
    pytest.param(
        lambda: m.parse_sasl_initial_response(split(m.sasl_initial_response("M", b""))[1]),
        ("M", b""),
        id="sasl_initial_response-empty-data",
    ),
    pytest.param(
        lambda: m.parse_sasl_initial_response(
            split(m.sasl_initial_response("M", b"\x00\xff\x00"))[1]
        ),
        ("M", b"\x00\xff\x00"),
        id="sasl_initial_response-binary-data",
    ),
    pytest.param(
        lambda: m.parse_sasl_initial_response(b"SCRAM-SHA-256\x00\xff\xff\xff\xff"),
        ("SCRAM-SHA-256", b""),
        id="sasl_initial_response-length-minus-1",
    ),
    pytest.param(
        lambda: m.parse_parameter_status(
            split(m.parameter_status("TimeZone", "Europe/Z\u00fcrich"))[1]
        ),
        ("TimeZone", "Europe/Z\u00fcrich"),
        id="parameter_status",
    ),
    pytest.param(
        lambda: m.parse_parameter_status(split(m.parameter_status("application_name", ""))[1]),
        ("application_name", ""),
        id="parameter_status-empty-value",
    ),
    pytest.param(
        lambda: m.parse_backend_key_data(split(m.backend_key_data(0, 0))[1]),
        (0, 0),
        id="backend_key_data-zero",
    ),
    pytest.param(
        lambda: m.parse_backend_key_data(split(m.backend_key_data(0x7FFFFFFF, 0xFFFFFFFF))[1]),
        (0x7FFFFFFF, 0xFFFFFFFF),
        id="backend_key_data-max",
    ),
    pytest.param(
        lambda: m.parse_ready_for_query(split(m.ready_for_query(m.IDLE))[1]), ord("I"), id="rfq-I"
    ),
    pytest.param(
        lambda: m.parse_ready_for_query(split(m.ready_for_query(m.IN_TRANSACTION))[1]),
        ord("T"),
        id="rfq-T",
    ),
    pytest.param(
        lambda: m.parse_ready_for_query(split(m.ready_for_query(m.FAILED_TRANSACTION))[1]),
        ord("E"),
        id="rfq-E",
    ),
    pytest.param(
        lambda: m.parse_negotiate_protocol_version(split(m.negotiate_protocol_version(0, []))[1]),
        (0, []),
        id="negotiate-no-options",
    ),
    pytest.param(
        lambda: m.parse_negotiate_protocol_version(
            split(m.negotiate_protocol_version(2, ["_pq_.a", "_pq_.b"]))[1]
        ),
        (2, ["_pq_.a", "_pq_.b"]),
        id="negotiate-two-options",
    ),
    pytest.param(
        lambda: m.parse_query(split(m.query("SELECT 'h\u00e9'"))[1]), "SELECT 'h\u00e9'", id="query"
    ),
    pytest.param(lambda: m.parse_query(split(m.query(""))[1]), "", id="query-empty"),
]


@pytest.mark.parametrize(("run", "expected"), ROUND_TRIPS)
def test_round_trip(run, expected):
    assert run() == expected


# --- Builders refuse what cannot be encoded -------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: m.auth_md5(b"abc"), id="md5-salt-3-bytes"),
        pytest.param(lambda: m.auth_md5(b"abcde"), id="md5-salt-5-bytes"),
        pytest.param(lambda: m.query("SELECT 1\0; DROP TABLE t"), id="query-with-nul"),
        pytest.param(lambda: m.parameter_status("a\0b", "v"), id="parameter-name-with-nul"),
        pytest.param(lambda: m.error_response("XX000", "a\0b"), id="error-message-with-nul"),
        pytest.param(lambda: m.auth_sasl(["SCRAM\0"]), id="mechanism-with-nul"),
    ],
)
def test_builder_rejects(build):
    with pytest.raises(ValueError):
        build()


# --- Parse errors ----------------------------------------------------------------------------

PARSE_ERRORS = [
    pytest.param(m.parse_error_fields, b"", id="error-empty"),
    pytest.param(m.parse_error_fields, b"SERROR", id="error-value-unterminated"),
    pytest.param(m.parse_error_fields, b"SERROR\x00", id="error-no-final-terminator"),
    pytest.param(m.parse_error_fields, b"SERROR\x00M", id="error-truncated-after-code"),
    pytest.param(m.parse_error_fields, b"M\xff\xfe\x00\x00", id="error-non-utf8"),
    pytest.param(m.parse_authentication, b"", id="auth-empty"),
    pytest.param(m.parse_authentication, b"\x00\x00\x00", id="auth-3-bytes"),
    pytest.param(m.parse_sasl_mechanisms, b"", id="mechanisms-empty"),
    pytest.param(m.parse_sasl_mechanisms, b"SCRAM-SHA-256", id="mechanisms-unterminated-name"),
    pytest.param(
        m.parse_sasl_mechanisms, b"SCRAM-SHA-256\x00", id="mechanisms-no-final-terminator"
    ),
    pytest.param(m.parse_password_message, b"", id="password-empty"),
    pytest.param(m.parse_password_message, b"secret", id="password-unterminated"),
    pytest.param(m.parse_password_message, b"sec\x00ret\x00", id="password-embedded-nul"),
    pytest.param(m.parse_sasl_initial_response, b"", id="sasl-initial-empty"),
    pytest.param(
        m.parse_sasl_initial_response, b"SCRAM-SHA-256", id="sasl-initial-name-unterminated"
    ),
    pytest.param(
        m.parse_sasl_initial_response,
        b"SCRAM-SHA-256\x00\x00\x00",
        id="sasl-initial-length-truncated",
    ),
    pytest.param(
        m.parse_sasl_initial_response,
        b"SCRAM-SHA-256\x00\x00\x00\x00\x05abc",
        id="sasl-initial-data-short",
    ),
    pytest.param(
        m.parse_sasl_initial_response,
        b"SCRAM-SHA-256\x00\x00\x00\x00\x01abc",
        id="sasl-initial-data-long",
    ),
    pytest.param(
        m.parse_sasl_initial_response,
        b"SCRAM-SHA-256\x00\xff\xff\xff\xfeab",
        id="sasl-initial-length-minus-2",
    ),
    pytest.param(m.parse_parameter_status, b"", id="parameter-empty"),
    pytest.param(m.parse_parameter_status, b"name\x00", id="parameter-no-value"),
    pytest.param(m.parse_parameter_status, b"name\x00value", id="parameter-value-unterminated"),
    pytest.param(m.parse_parameter_status, b"name\x00value\x00x", id="parameter-trailing-bytes"),
    pytest.param(m.parse_parameter_status, b"n\xc3\x00v\x00", id="parameter-non-utf8"),
    pytest.param(m.parse_backend_key_data, b"\x00" * 7, id="key-data-7-bytes"),
    pytest.param(m.parse_backend_key_data, b"\x00" * 9, id="key-data-9-bytes"),
    pytest.param(m.parse_backend_key_data, b"", id="key-data-empty"),
    pytest.param(m.parse_ready_for_query, b"", id="rfq-empty"),
    pytest.param(m.parse_ready_for_query, b"X", id="rfq-unknown-status"),
    pytest.param(m.parse_ready_for_query, b"II", id="rfq-two-bytes"),
    pytest.param(m.parse_negotiate_protocol_version, b"\x00" * 7, id="negotiate-7-bytes"),
    pytest.param(
        m.parse_negotiate_protocol_version,
        b"\x00\x00\x00\x00\x00\x00\x00\x01",
        id="negotiate-missing-name",
    ),
    pytest.param(
        m.parse_negotiate_protocol_version,
        b"\x00\x00\x00\x00\x00\x00\x00\x02_pq_.a\x00",
        id="negotiate-count-exceeds-names",
    ),
    pytest.param(
        m.parse_negotiate_protocol_version,
        b"\x00\x00\x00\x00\x00\x00\x00\x01_pq_.a",
        id="negotiate-name-unterminated",
    ),
    pytest.param(
        m.parse_negotiate_protocol_version,
        b"\x00\x00\x00\x00\xff\xff\xff\xff_pq_.a\x00",
        id="negotiate-huge-count",
    ),
    pytest.param(m.parse_row_description, b"\x00", id="row-description-1-byte"),
    pytest.param(m.parse_row_description, b"\x00\x01a\x00\x00\x00", id="row-description-field-truncated"),
    pytest.param(m.parse_row_description, b"\x00\x00x", id="row-description-trailing-bytes"),
    pytest.param(m.parse_data_row, b"", id="data-row-empty"),
    pytest.param(m.parse_data_row, b"\x00\x01\x00\x00\x00\x05abc", id="data-row-value-truncated"),
    pytest.param(m.parse_data_row, b"\x00\x01\x00\x00", id="data-row-length-truncated"),
    pytest.param(m.parse_data_row, b"\x00\x00\x00", id="data-row-trailing-bytes"),
    pytest.param(m.parse_query, b"", id="query-empty-body"),
    pytest.param(m.parse_query, b"SELECT 1", id="query-unterminated"),
    pytest.param(m.parse_query, b"SELECT 1\x00x", id="query-trailing-bytes"),
    pytest.param(m.parse_query, b"SELECT '\xff'\x00", id="query-non-utf8"),
]


@pytest.mark.parametrize(("parse", "body"), PARSE_ERRORS)
def test_parse_error(parse, body):
    with pytest.raises(ProtocolError) as info:
        parse(body)
    assert info.value.sqlstate == "08P01"


def test_sasl_initial_response_minus_one_with_trailing_data_rejected():
    with pytest.raises(ProtocolError):
        m.parse_sasl_initial_response(b"SCRAM-SHA-256\x00\xff\xff\xff\xffn,,n=,r=abc")


# --- MessageReader -------------------------------------------------------------------------

STREAM_MESSAGES = [
    (b"R", b"\x00\x00\x00\x00"),
    (b"S", b"server_version\x0016.2\x00"),
    (b"K", b"\x00\x00\x04\xd2\x00\x00\x16\x2e"),
    (b"X", b""),
    (b"Z", b"I"),
]
STREAM = b"".join(frame(t, b) for t, b in STREAM_MESSAGES)


def drain(reader: MessageReader) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(len(STREAM)):  # bounded: every message is at least 5 bytes
        msg = reader.next()
        if msg is None:
            return out
        out.append(msg)
    raise AssertionError("MessageReader.next() did not stop")


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_reader_split_at_every_boundary(cut):
    reader = MessageReader()
    reader.feed(STREAM[:cut])
    first = drain(reader)
    reader.feed(STREAM[cut:])
    second = drain(reader)
    assert first + second == STREAM_MESSAGES
    # Nothing is handed out before its last byte arrives.
    complete = 0
    end = 0
    for _type, b in STREAM_MESSAGES:
        end += HEADER_SIZE + len(b)
        if end <= cut:
            complete += 1
    assert len(first) == complete
    assert len(reader) == 0


def test_reader_byte_at_a_time():
    reader = MessageReader()
    got = []
    for i in range(len(STREAM)):
        reader.feed(STREAM[i : i + 1])
        got += drain(reader)
    assert got == STREAM_MESSAGES
    assert len(reader) == 0
    assert reader.next() is None


def test_reader_iter_stops_at_partial_message():
    reader = MessageReader()
    reader.feed(STREAM + b"Q\x00\x00\x00\x0dSELECT")
    assert list(reader) == STREAM_MESSAGES
    assert len(reader) == 11
    reader.feed(b" 1\x00")
    assert list(reader) == [(b"Q", b"SELECT 1\x00")]
    assert len(reader) == 0


def test_reader_incomplete_header_returns_none():
    reader = MessageReader()
    reader.feed(b"Z\x00\x00\x00")
    assert reader.next() is None
    assert len(reader) == 4


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_reader_length_under_4(length):
    reader = MessageReader()
    reader.feed(b"Q" + struct.pack("!I", length))
    with pytest.raises(ProtocolError) as info:
        reader.next()
    assert info.value.sqlstate == "08P01"


def test_reader_length_over_max_size():
    reader = MessageReader(max_size=100)
    reader.feed(b"d" + struct.pack("!I", 101))
    with pytest.raises(ProtocolError) as info:
        reader.next()
    assert info.value.sqlstate == "54000"


def test_reader_length_equal_to_max_size_accepted():
    reader = MessageReader(max_size=100)
    message = frame(b"d", b"x" * 96)
    reader.feed(message[:50])
    assert reader.next() is None
    reader.feed(message[50:])
    assert reader.next() == (b"d", b"x" * 96)


def test_reader_default_max_is_1GiB():
    assert DEFAULT_MAX_MESSAGE_SIZE == 1 << 30
    reader = MessageReader()
    reader.feed(b"d" + struct.pack("!I", 1 << 30))
    assert reader.next() is None  # allowed, just incomplete
    reader = MessageReader()
    reader.feed(b"d" + struct.pack("!I", (1 << 30) + 1))
    with pytest.raises(ProtocolError) as info:
        reader.next()
    assert info.value.sqlstate == "54000"


def test_reader_take_rest():
    reader = MessageReader()
    tail = b"Q\x00\x00\x00\x0dSEL"
    reader.feed(frame(b"Z", b"I") + frame(b"S", b"a\x00b\x00") + tail)
    assert reader.next() == (b"Z", b"I")
    assert reader.take_rest() == frame(b"S", b"a\x00b\x00") + tail
    assert len(reader) == 0
    assert reader.next() is None
    assert reader.take_rest() == b""
    reader.feed(b"X\x00\x00\x00\x04")
    assert reader.next() == (b"X", b"")
