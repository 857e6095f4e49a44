"""Startup-phase packets (PostgreSQL docs, 55.2.1 "Start-up" and 55.7 "Message Formats").

Packets are built by hand with ``struct`` so that a bug shared by the builders and the
parser cannot hide; the builders are checked against the same literal bytes.
"""

from __future__ import annotations

import struct

import pytest

from router.protocol.errors import ProtocolError, SQLState
from router.protocol.startup import (
    MAX_STARTUP_PACKET,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    build_cancel_request,
    build_gssenc_request,
    build_ssl_request,
    build_startup_message,
    parse_startup_packet,
    startup_packet_length,
)

# Request codes from 55.7: the protocol version is major << 16 | minor; the special
# requests use codes with 1234 in the major half.
V3_0 = 0x0003_0000
V3_1 = 0x0003_0001
SSL_CODE = 0x04D2_162F  # 80877103
GSSENC_CODE = 0x04D2_1630  # 80877104
CANCEL_CODE = 0x04D2_162E  # 80877102


def packet(code: int, body: bytes = b"") -> bytes:
    """Int32 length (counting itself), Int32 code, then the body."""
    return struct.pack("!II", 8 + len(body), code) + body


def params(*pairs: tuple[bytes, bytes]) -> bytes:
    """StartupMessage body: NUL-terminated name/value pairs, then one more NUL."""
    return b"".join(name + b"\0" + value + b"\0" for name, value in pairs) + b"\0"


# --- StartupMessage ----------------------------------------------------------------------

VALID_STARTUP = [
    pytest.param(
        packet(V3_0, params((b"user", b"alice"))),
        {"user": "alice"},
        "alice",
        "alice",
        id="user-only-database-defaults-to-user",
    ),
    pytest.param(
        packet(V3_0, params((b"user", b"alice"), (b"database", b"sales"))),
        {"user": "alice", "database": "sales"},
        "alice",
        "sales",
        id="user-and-database",
    ),
    pytest.param(
        packet(V3_0, params((b"user", b"alice"), (b"database", b""))),
        {"user": "alice", "database": ""},
        "alice",
        "alice",
        id="empty-database-defaults-to-user",
    ),
    pytest.param(
        packet(
            V3_0,
            params(
                (b"user", b"bob"),
                (b"database", b"app"),
                (b"application_name", b"psql"),
                (b"options", b"-c search_path=tenant_7 -c statement_timeout=5s"),
                (b"client_encoding", b"UTF8"),
                (b"DateStyle", b"ISO, MDY"),
                (b"replication", b"database"),
            ),
        ),
        {
            "user": "bob",
            "database": "app",
            "application_name": "psql",
            "options": "-c search_path=tenant_7 -c statement_timeout=5s",
            "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY",
            "replication": "database",
        },
        "bob",
        "app",
        id="application_name-options-and-extra-params-kept",
    ),
    pytest.param(
        packet(V3_0, params((b"user", "jos\u00e9".encode()), (b"application_name", b""))),
        {"user": "jos\u00e9", "application_name": ""},
        "jos\u00e9",
        "jos\u00e9",
        id="utf8-user-and-empty-value",
    ),
    pytest.param(
        packet(V3_0, b"\0"),
        {},
        "",
        "",
        id="no-parameters",
    ),
]


@pytest.mark.parametrize(("data", "expected_params", "user", "database"), VALID_STARTUP)
def test_startup_message_parses(data, expected_params, user, database):
    msg = parse_startup_packet(data)
    assert isinstance(msg, StartupMessage)
    assert (msg.major, msg.minor) == (3, 0)
    assert msg.params == expected_params
    assert list(msg.params) == list(expected_params)  # order of the packet is kept
    assert msg.user == user
    assert msg.database == database
    assert msg.protocol_options == []


def test_protocol_3_1_with_pq_options():
    data = packet(
        V3_1,
        params(
            (b"user", b"alice"),
            (b"_pq_.compression", b"on"),
            (b"database", b"d"),
            (b"_pq_.report_parameters", b"search_path"),
        ),
    )
    msg = parse_startup_packet(data)
    assert isinstance(msg, StartupMessage)
    assert (msg.major, msg.minor) == (3, 1)
    assert msg.protocol_options == ["_pq_.compression", "_pq_.report_parameters"]
    assert msg.params == {
        "user": "alice",
        "_pq_.compression": "on",
        "database": "d",
        "_pq_.report_parameters": "search_path",
    }


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(2 << 16, id="2.0"),
        pytest.param(1 << 16, id="1.0"),
        pytest.param(4 << 16, id="4.0"),
        pytest.param((4 << 16) | 2, id="4.2"),
        pytest.param((1234 << 16) | 5000, id="1234.5000-not-a-special-request"),
    ],
)
def test_unsupported_protocol_version_refused(code):
    with pytest.raises(ProtocolError) as info:
        parse_startup_packet(packet(code, params((b"user", b"alice"))))
    assert info.value.sqlstate == SQLState.FEATURE_NOT_SUPPORTED == "0A000"
    assert info.value.severity == "FATAL"


# --- SSLRequest, GSSENCRequest, CancelRequest -------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"\x00\x00\x00\x08\x04\xd2\x16\x2f", SSLRequest(), id="ssl"),
        pytest.param(b"\x00\x00\x00\x08\x04\xd2\x16\x30", GSSENCRequest(), id="gssenc"),
        pytest.param(
            b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\xde\xad\xbe\xef",
            CancelRequest(12345, 0xDEADBEEF),
            id="cancel",
        ),
        pytest.param(
            packet(CANCEL_CODE, struct.pack("!II", 0, 0)), CancelRequest(0, 0), id="cancel-zeros"
        ),
        pytest.param(
            packet(CANCEL_CODE, struct.pack("!II", 0xFFFFFFFF, 0x80000000)),
            CancelRequest(0xFFFFFFFF, 0x80000000),
            id="cancel-high-bits",
        ),
    ],
)
def test_special_requests_parse(data, expected):
    assert parse_startup_packet(data) == expected


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        pytest.param(build_ssl_request(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f", id="ssl"),
        pytest.param(build_gssenc_request(), b"\x00\x00\x00\x08\x04\xd2\x16\x30", id="gssenc"),
        pytest.param(
            build_cancel_request(12345, 0xDEADBEEF),
            b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\xde\xad\xbe\xef",
            id="cancel",
        ),
        pytest.param(
            build_startup_message({"user": "u", "database": "d"}),
            b"\x00\x00\x00\x1b\x00\x03\x00\x00user\0u\0database\0d\0\0",
            id="startup",
        ),
        pytest.param(
            build_startup_message({}), b"\x00\x00\x00\x09\x00\x03\x00\x00\0", id="startup-empty"
        ),
    ],
)
def test_builders_exact_bytes(built, expected):
    assert built == expected


@pytest.mark.parametrize(
    ("pid", "key"),
    [
        pytest.param(1, 2, id="small"),
        pytest.param(0x7FFFFFFF, 0x12345678, id="int32-max-pid"),
        pytest.param(0xFFFFFFFF, 0xFFFFFFFF, id="all-ones"),
    ],
)
def test_cancel_request_round_trip(pid, key):
    assert parse_startup_packet(build_cancel_request(pid, key)) == CancelRequest(pid, key)


def test_startup_message_round_trip():
    values = {
        "user": "tenant_42",
        "database": "orders",
        "application_name": "billing \u2603",
        "options": "-c default_transaction_read_only=on",
        "custom.setting": "x",
    }
    msg = parse_startup_packet(build_startup_message(values))
    assert isinstance(msg, StartupMessage)
    assert (msg.major, msg.minor) == (3, 0)
    assert msg.params == values


# --- Malformed packets ---------------------------------------------------------------------

MALFORMED = [
    pytest.param(b"", "incomplete", id="empty"),
    pytest.param(b"\x00\x00\x00\x07\x00\x03\x00", "incomplete", id="seven-bytes"),
    pytest.param(packet(V3_0), "NUL-terminated", id="startup-without-body"),
    pytest.param(packet(V3_0, b"user\0alice"), "NUL-terminated", id="value-not-terminated"),
    pytest.param(packet(V3_0, b"user\0alice\0"), None, id="missing-final-nul"),
    pytest.param(packet(V3_0, b"user"), "NUL-terminated", id="name-not-terminated"),
    pytest.param(packet(V3_0, b"user\0\0"), "without a value", id="name-without-value"),
    pytest.param(
        packet(V3_0, b"user\0alice\0database\0\0"),
        "without a value",
        id="second-name-without-value",
    ),
    pytest.param(packet(V3_0, b"\0alice\0\0"), "empty parameter name", id="empty-name"),
    pytest.param(
        packet(V3_0, b"user\0alice\0\0x\0\0"), "empty parameter name", id="bytes-after-terminator"
    ),
    pytest.param(packet(V3_0, params((b"us\xffer", b"alice"))), "UTF-8", id="non-utf8-name"),
    pytest.param(packet(V3_0, params((b"user", b"al\xc3"))), "UTF-8", id="non-utf8-value"),
    pytest.param(
        struct.pack("!II", 100, V3_0) + params((b"user", b"alice")),
        "does not match",
        id="length-field-too-large",
    ),
    pytest.param(
        struct.pack("!II", 12, V3_0) + params((b"user", b"alice")),
        "does not match",
        id="length-field-too-small",
    ),
    pytest.param(packet(SSL_CODE, b"\0\0\0\0"), "SSLRequest", id="ssl-with-extra-bytes"),
    pytest.param(packet(GSSENC_CODE, b"\0"), "GSSENCRequest", id="gssenc-with-extra-byte"),
    pytest.param(packet(CANCEL_CODE, b"\0\0\0\1"), "CancelRequest", id="cancel-too-short"),
    pytest.param(packet(CANCEL_CODE, b"\0\0\0\1\0\0\0\2\0"), "CancelRequest", id="cancel-too-long"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED)
def test_malformed_startup_packet(data, message):
    with pytest.raises(ProtocolError, match=message) as info:
        parse_startup_packet(data)
    assert info.value.sqlstate == SQLState.PROTOCOL_VIOLATION == "08P01"


# --- startup_packet_length -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"", None, id="nothing-yet"),
        pytest.param(b"\x00\x00\x00", None, id="three-bytes"),
        pytest.param(b"\x00\x00\x00\x08", 8, id="minimum-8-length-only"),
        pytest.param(build_ssl_request(), 8, id="ssl-request"),
        pytest.param(build_cancel_request(1, 2), 16, id="cancel-request"),
        pytest.param(b"\x00\x00\x00\x10\x04\xd2", 16, id="partial-code"),
        pytest.param(struct.pack("!I", MAX_STARTUP_PACKET), 10 * 1024, id="exactly-10KiB"),
    ],
)
def test_startup_packet_length(data, expected):
    assert startup_packet_length(data) == expected
    assert startup_packet_length(bytearray(data)) == expected


@pytest.mark.parametrize(
    "length",
    [
        pytest.param(0, id="zero"),
        pytest.param(4, id="four"),
        pytest.param(7, id="seven"),
        pytest.param(10 * 1024 + 1, id="10KiB-plus-1"),
        pytest.param(1 << 31, id="2GiB"),
        pytest.param(0xFFFFFFFF, id="uint32-max"),
    ],
)
def test_startup_packet_length_impossible(length):
    with pytest.raises(ProtocolError) as info:
        startup_packet_length(struct.pack("!I", length) + b"\x00\x03\x00\x00")
    assert info.value.sqlstate == "08P01"


def test_max_startup_packet_is_10KiB():
    assert MAX_STARTUP_PACKET == 10240
