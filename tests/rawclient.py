"""A minimal blocking wire-protocol client for tests that must send what real clients never
would (malformed packets, oversized messages, silence). Built on the router's own codec."""

from __future__ import annotations

import socket
import struct

from router.protocol import messages as m
from router.protocol.framing import MessageReader
from router.protocol.startup import build_startup_message


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = MessageReader()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def startup(self, user: str, database: str = "app", **params: str) -> None:
        self.send(build_startup_message({"user": user, "database": database, **params}))

    def recv_message(self) -> tuple[bytes, bytes] | None:
        """The next whole message, or None when the router closed the connection."""
        while True:
            msg = self.reader.next()
            if msg is not None:
                return msg
            data = self.sock.recv(65536)
            if not data:
                return None
            self.reader.feed(data)

    def recv_until(self, msg_type: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            msg = self.recv_message()
            if msg is None:
                raise ConnectionError(f"closed before {msg_type!r}; got {out}")
            out.append(msg)
            if msg[0] == msg_type:
                return out

    def login_trust(self, user: str = "carol", database: str = "app") -> list[tuple[bytes, bytes]]:
        self.startup(user, database)
        return self.recv_until(b"Z")

    def error_and_close(self) -> dict[str, str]:
        """Expect an ErrorResponse followed by the router closing the connection."""
        msg = self.recv_message()
        assert msg is not None and msg[0] == b"E", f"expected ErrorResponse, got {msg}"
        fields = m.parse_error_fields(msg[1])
        assert self.is_closed(), "router did not close the connection after the error"
        return fields

    def is_closed(self) -> bool:
        try:
            while True:
                if self.reader.next() is not None:
                    continue
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.reader.feed(data)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def raw_packet(length_field: int, body: bytes) -> bytes:
    """A startup-phase packet with an arbitrary (possibly lying) length field."""
    return struct.pack("!I", length_field) + body
