"""Startup-phase packets (PostgreSQL docs, 55.2.1 "Start-up" and 55.7): StartupMessage,
SSLRequest, GSSENCRequest and CancelRequest. None has a type byte: Int32 length, Int32 code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from router.protocol.errors import ProtocolError

PROTOCOL_MAJOR = 3
PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# PostgreSQL's own limit on a startup packet is 10000 bytes (MAX_STARTUP_PACKET_LENGTH in
# src/include/libpq/pqcomm.h); the issue fixes ours at 10 KiB, which is slightly larger.
MAX_STARTUP_PACKET = 10 * 1024

_II = struct.Struct("!II")
_III = struct.Struct("!III")


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        # Per the protocol, database defaults to the user name.
        return self.params.get("database") or self.user

    @property
    def protocol_options(self) -> list[str]:
        """Parameters starting with ``_pq_.``: protocol extensions this router does not know."""
        return [k for k in self.params if k.startswith("_pq_.")]


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def startup_packet_length(data: bytes | bytearray) -> int | None:
    """Length of the startup packet at the start of ``data``, or None if not all 4 bytes are in.

    Raises ProtocolError when the length is impossible (under 8 or over MAX_STARTUP_PACKET).
    """
    if len(data) < 4:
        return None
    length = struct.unpack_from("!I", data, 0)[0]
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolError(f"invalid startup packet length {length}")
    return length


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Parse one whole startup-phase packet (length prefix included)."""
    if len(packet) < 8:
        raise ProtocolError("incomplete startup packet")
    length, code = _II.unpack_from(packet, 0)
    if length != len(packet):
        raise ProtocolError("startup packet length does not match its size")
    if code == SSL_REQUEST_CODE:
        if length != 8:
            raise ProtocolError("invalid SSLRequest length")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if length != 8:
            raise ProtocolError("invalid GSSENCRequest length")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if length != 16:
            raise ProtocolError("invalid CancelRequest length")
        _, _, pid, key = struct.unpack_from("!IIII", packet, 0)
        return CancelRequest(pid, key)
    major, minor = code >> 16, code & 0xFFFF
    if major != PROTOCOL_MAJOR:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
            sqlstate="0A000",
        )
    return StartupMessage(major, minor, _parse_params(packet[8:]))


def _parse_params(body: bytes) -> dict[str, str]:
    # Body: pairs of NUL-terminated name and value strings, ended by one extra NUL.
    if not body or body[-1] != 0:
        raise ProtocolError("startup packet is not NUL-terminated")
    parts = body[:-1].split(b"\0")
    if parts == [b""]:
        return {}
    if parts[-1] != b"" or len(parts) % 2 != 1:
        raise ProtocolError("startup packet has a parameter without a value")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts) - 1, 2):
            name = parts[i].decode("utf-8")
            if not name:
                raise ProtocolError("startup packet has an empty parameter name")
            params[name] = parts[i + 1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("startup packet is not valid UTF-8") from exc
    return params


def build_startup_message(params: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!II", len(body) + 8, PROTOCOL_3_0) + body


def build_ssl_request() -> bytes:
    return _II.pack(8, SSL_REQUEST_CODE)


def build_gssenc_request() -> bytes:
    return _II.pack(8, GSSENC_REQUEST_CODE)


def build_cancel_request(process_id: int, secret_key: int) -> bytes:
    return struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, process_id, secret_key)
