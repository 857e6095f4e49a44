"""Protocol 3.0 framing: a message is a type byte, then a 4-byte big-endian length that
counts itself and the body (PostgreSQL docs, 55.7 "Message Formats"). The startup-phase
packets have no type byte: 4-byte length, then the body.

These functions do no I/O. The proxy's hot path does its own header scanning inline for
speed (see frontend/client.py); this module is the reference used everywhere else.
"""

from __future__ import annotations

import struct

from router.protocol.errors import ProtocolError

HEADER_SIZE = 5
_LENGTH = struct.Struct("!I")

# Default for `max_message_size`: PostgreSQL itself refuses a message over 1 GiB
# (PQ_LARGE_MESSAGE_LIMIT in src/backend/libpq/pqcomm.c is 1 GiB - 1).
DEFAULT_MAX_MESSAGE_SIZE = 1 << 30


def frame(msg_type: bytes, body: bytes = b"") -> bytes:
    """Build one typed message from its body."""
    return msg_type + _LENGTH.pack(len(body) + 4) + body


def read_length(data: bytes | bytearray | memoryview, offset: int) -> int:
    """The length field at ``offset`` (which counts itself, so it is at least 4)."""
    return _LENGTH.unpack_from(data, offset)[0]


class MessageReader:
    """Sans-I/O splitter for typed messages: feed bytes, take whole ``(type, body)`` pairs.

    Used on the slow paths (authentication, control messages). Raises ``ProtocolError`` for
    a length under 4 or over ``max_size``; it never loops without consuming input.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        """Hand back unconsumed bytes (when the hot path takes over the connection)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def next(self) -> tuple[bytes, bytes] | None:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        length = _LENGTH.unpack_from(buf, 1)[0]
        if length < 4:
            raise ProtocolError(f"invalid message length {length}")
        if length > self._max:
            raise ProtocolError(
                f"message of {length} bytes exceeds max_message_size ({self._max})",
                sqlstate="54000",
            )
        end = 1 + length
        if len(buf) < end:
            return None
        msg_type = bytes(buf[0:1])
        body = bytes(buf[HEADER_SIZE:end])
        del buf[:end]
        return msg_type, body

    def __iter__(self):
        while (msg := self.next()) is not None:
            yield msg
