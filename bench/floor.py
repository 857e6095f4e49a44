"""The floor: what forwarding alone costs in Python with uvloop, for the benchmark table.

    .venv/bin/python -m bench.floor LISTEN_PORT SERVER_PORT

A byte pipe, one server connection per client (no pooling, no login of its own: the client's
startup goes through to PostgreSQL), that finds message boundaries in both directions as the
router's hot path does and forwards every chunk as it came. It is not a product and not a
proxy anyone should run: `bench.run --floor` puts it next to the router so the table shows
how much of the router's cost is Python and uvloop themselves and how much is the router's
own work per transaction (pooling, session tracking, statistics).
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

_SSL_REQUEST = (80877103).to_bytes(4, "big")
_GSSENC_REQUEST = (80877104).to_bytes(4, "big")


def _boundaries(data: bytes, skip: int, head: bytes) -> tuple[int, bytes]:
    """Walk the 5-byte headers of ``data``, as the router's hot path does: ``skip`` bytes
    finish an earlier message, ``head`` is a header split across reads (already forwarded).
    Returns the same two for the next read."""
    if head:
        data = head + data
    pos, n = skip, len(data)
    while pos + 5 <= n:
        pos += 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
    return (pos - n, b"") if pos >= n else (0, data[pos:])


class _Server(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.skip, self.head = 0, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.skip, self.head = _boundaries(data, self.skip, self.head)
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.server: _Server | None = None
        self.early: list[bytes] = []  # the startup packet, until the server connection is up
        self.skip, self.head = 0, b""
        self.untyped = True  # the startup packet (and an SSLRequest before it) has no type byte

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(lambda: _Server(self), "127.0.0.1", self.server_port)
        except OSError:
            self.transport.close()
            return
        self.server = server
        for data in self.early:
            server.transport.write(data)
        self.early = []

    def data_received(self, data: bytes) -> None:
        if self.untyped:
            # An SSLRequest or GSSENCRequest (8 bytes) is followed by the startup packet.
            self.untyped = len(data) == 8 and data[4:8] in (_SSL_REQUEST, _GSSENC_REQUEST)
        else:
            self.skip, self.head = _boundaries(data, self.skip, self.head)
        if self.server is None:
            self.early.append(data)
        else:
            self.server.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server is not None:
            self.server.transport.close()


async def serve(listen_port: int, server_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(server_port), "127.0.0.1", listen_port)
    print(f"floor listening on 127.0.0.1:{listen_port}", flush=True)
    await server.serve_forever()


def main() -> None:
    listen_port, server_port = int(sys.argv[1]), int(sys.argv[2])
    uvloop.install()
    try:
        asyncio.run(serve(listen_port, server_port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
