"""Builders and parsers for the messages the router itself sends or reads
(PostgreSQL docs, 55.7 "Message Formats" and 55.8 "Error and Notice Message Fields").

Everything here works on bytes and returns bytes or plain values; no I/O.
"""

from __future__ import annotations

import struct

from router.protocol.errors import ProtocolError
from router.protocol.framing import frame

# Backend message types.
AUTHENTICATION = b"R"
PARAMETER_STATUS = b"S"
BACKEND_KEY_DATA = b"K"
READY_FOR_QUERY = b"Z"
ERROR_RESPONSE = b"E"
NOTICE_RESPONSE = b"N"
NOTIFICATION_RESPONSE = b"A"
NEGOTIATE_PROTOCOL_VERSION = b"v"
ROW_DESCRIPTION = b"T"
DATA_ROW = b"D"
COMMAND_COMPLETE = b"C"
EMPTY_QUERY_RESPONSE = b"I"

TEXT_OID = 25  # pg_type.oid of text

# Authentication request codes (55.7, AuthenticationXXX).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_I = struct.Struct("!I")
_II = struct.Struct("!II")
_H = struct.Struct("!H")
# RowDescription, per field after its name: table OID, column number, type OID, type size,
# type modifier, format code.
_FIELD = struct.Struct("!IhIhih")

# ReadyForQuery transaction status bytes.
IDLE = ord("I")
IN_TRANSACTION = ord("T")
FAILED_TRANSACTION = ord("E")


def _cstr(value: str) -> bytes:
    data = value.encode("utf-8")
    if b"\0" in data:
        raise ValueError("string contains NUL")
    return data + b"\0"


def _split_cstr(body: bytes, offset: int) -> tuple[str, int]:
    end = body.find(b"\0", offset)
    if end < 0:
        raise ProtocolError("missing string terminator")
    try:
        return body[offset:end].decode("utf-8"), end + 1
    except UnicodeDecodeError as exc:
        raise ProtocolError("string is not valid UTF-8") from exc


# --- ErrorResponse / NoticeResponse ---------------------------------------------------

def _fields_body(fields: dict[str, str]) -> bytes:
    out = bytearray()
    for code, value in fields.items():
        out += code.encode("ascii") + _cstr(value)
    out += b"\0"
    return bytes(out)


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """ErrorResponse. 'S' is the localisable severity, 'V' the non-localised one (9.6+)."""
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail:
        fields["D"] = detail
    if hint:
        fields["H"] = hint
    return frame(ERROR_RESPONSE, _fields_body(fields))


def notice_response(sqlstate: str, message: str, *, severity: str = "NOTICE") -> bytes:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    return frame(NOTICE_RESPONSE, _fields_body(fields))


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse body, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    offset = 0
    while True:
        if offset >= len(body):
            raise ProtocolError("error fields are not terminated")
        code = body[offset]
        if code == 0:
            return fields
        value, offset = _split_cstr(body, offset + 1)
        fields[chr(code)] = value


# --- Authentication -------------------------------------------------------------------

def auth_ok() -> bytes:
    return frame(AUTHENTICATION, _I.pack(AUTH_OK))


def auth_cleartext() -> bytes:
    return frame(AUTHENTICATION, _I.pack(AUTH_CLEARTEXT))


def auth_md5(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("md5 salt is 4 bytes")
    return frame(AUTHENTICATION, _I.pack(AUTH_MD5) + salt)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return frame(AUTHENTICATION, _I.pack(AUTH_SASL) + b"".join(_cstr(m) for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return frame(AUTHENTICATION, _I.pack(AUTH_SASL_CONTINUE) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return frame(AUTHENTICATION, _I.pack(AUTH_SASL_FINAL) + data)


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    """(request code, the rest of the body)."""
    if len(body) < 4:
        raise ProtocolError("authentication message too short")
    return _I.unpack_from(body, 0)[0], body[4:]


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    mechanisms = []
    offset = 0
    while True:
        if offset >= len(payload):
            raise ProtocolError("SASL mechanism list is not terminated")
        if payload[offset] == 0:
            return mechanisms
        name, offset = _split_cstr(payload, offset)
        mechanisms.append(name)


# Frontend messages of the authentication exchange all have type 'p'.
PASSWORD_MESSAGE = b"p"


def password_message(password: bytes) -> bytes:
    return frame(PASSWORD_MESSAGE, password + b"\0")


def parse_password_message(body: bytes) -> bytes:
    if not body or body[-1] != 0 or b"\0" in body[:-1]:
        raise ProtocolError("malformed password message")
    return body[:-1]


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(PASSWORD_MESSAGE, _cstr(mechanism) + _I.pack(len(data)) + data)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mechanism, offset = _split_cstr(body, 0)
    if len(body) < offset + 4:
        raise ProtocolError("SASLInitialResponse too short")
    length = struct.unpack_from("!i", body, offset)[0]
    data = body[offset + 4 :]
    if length == -1:
        if data:
            raise ProtocolError("SASLInitialResponse has data after a -1 length")
    elif length != len(data):
        raise ProtocolError("SASLInitialResponse length mismatch")
    return mechanism, data


def sasl_response(data: bytes) -> bytes:
    return frame(PASSWORD_MESSAGE, data)


# --- Session set-up and status ----------------------------------------------------------

def parameter_status(name: str, value: str) -> bytes:
    return frame(PARAMETER_STATUS, _cstr(name) + _cstr(value))


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, offset = _split_cstr(body, 0)
    value, offset = _split_cstr(body, offset)
    if offset != len(body):
        raise ProtocolError("trailing bytes in ParameterStatus")
    return name, value


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return frame(BACKEND_KEY_DATA, _II.pack(process_id, secret_key))


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise ProtocolError("BackendKeyData must be 8 bytes")
    return _II.unpack(body)


def ready_for_query(status: int = IDLE) -> bytes:
    return frame(READY_FOR_QUERY, bytes((status,)))


def parse_ready_for_query(body: bytes) -> int:
    if len(body) != 1 or body[0] not in (IDLE, IN_TRANSACTION, FAILED_TRANSACTION):
        raise ProtocolError("malformed ReadyForQuery")
    return body[0]


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    body = _I.pack(newest_minor) + _I.pack(len(unrecognized))
    body += b"".join(_cstr(name) for name in unrecognized)
    return frame(NEGOTIATE_PROTOCOL_VERSION, body)


def parse_negotiate_protocol_version(body: bytes) -> tuple[int, list[str]]:
    if len(body) < 8:
        raise ProtocolError("NegotiateProtocolVersion too short")
    minor, count = _II.unpack_from(body, 0)
    names = []
    offset = 8
    for _ in range(count):
        name, offset = _split_cstr(body, offset)
        names.append(name)
    return minor, names


# --- A result the router answers itself (SHOW pgrouter.target) -----------------------------

def row_description(names: list[str]) -> bytes:
    """Text columns computed by a statement, as a server describes SHOW's: no table, type text
    (size -1, modifier -1), text format."""
    body = _H.pack(len(names)) + b"".join(_cstr(name) + _FIELD.pack(0, 0, TEXT_OID, -1, -1, 0) for name in names)
    return frame(ROW_DESCRIPTION, body)


def parse_row_description(body: bytes) -> list[tuple[str, int, int, int, int, int, int]]:
    """Each field as (name, table OID, column number, type OID, size, modifier, format)."""
    if len(body) < 2:
        raise ProtocolError("RowDescription too short")
    (count,) = _H.unpack_from(body, 0)
    fields = []
    offset = 2
    for _ in range(count):
        name, offset = _split_cstr(body, offset)
        if offset + _FIELD.size > len(body):
            raise ProtocolError("RowDescription field truncated")
        fields.append((name, *_FIELD.unpack_from(body, offset)))
        offset += _FIELD.size
    if offset != len(body):
        raise ProtocolError("trailing bytes in RowDescription")
    return fields


def data_row(values: list[str | None]) -> bytes:
    """One row of text values (None: NULL)."""
    body = bytearray(_H.pack(len(values)))
    for value in values:
        if value is None:
            body += b"\xff\xff\xff\xff"
        else:
            data = value.encode("utf-8")
            body += _I.pack(len(data)) + data
    return frame(DATA_ROW, bytes(body))


def parse_data_row(body: bytes) -> list[bytes | None]:
    if len(body) < 2:
        raise ProtocolError("DataRow too short")
    (count,) = _H.unpack_from(body, 0)
    values: list[bytes | None] = []
    offset = 2
    for _ in range(count):
        if offset + 4 > len(body):
            raise ProtocolError("DataRow value truncated")
        (length,) = _I.unpack_from(body, offset)
        offset += 4
        if length == 0xFFFFFFFF:
            values.append(None)
            continue
        if length > len(body) - offset:
            raise ProtocolError("DataRow value truncated")
        values.append(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise ProtocolError("trailing bytes in DataRow")
    return values


def command_complete(tag: str) -> bytes:
    return frame(COMMAND_COMPLETE, _cstr(tag))


def empty_query_response() -> bytes:
    return frame(EMPTY_QUERY_RESPONSE)


# --- A few frontend messages the router itself sends to servers -------------------------

def query(sql: str) -> bytes:
    return frame(b"Q", _cstr(sql))


def parse_query(body: bytes) -> str:
    sql, offset = _split_cstr(body, 0)
    if offset != len(body):
        raise ProtocolError("trailing bytes in Query")
    return sql


def terminate() -> bytes:
    return frame(b"X")


def sync() -> bytes:
    return frame(b"S")
