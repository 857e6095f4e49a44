"""TCP keepalive on the router's client and server sockets (tcp_keepalive, tcp_keepidle,
tcp_keepintvl, tcp_keepcnt, as PgBouncer names them).

Without it, a peer that vanishes without a FIN or RST (a powered-off client host, a dropped
network path) leaves its connection open for ever: a client in session mode, pinned, or in a
transaction keeps its server connection from everyone, and a dead server connection waits in
the pool. With it, the kernel probes an idle connection and closes it when the probes go
unanswered, and the router treats it as any closed connection.
"""

from __future__ import annotations

import asyncio
import socket

from router.config import Settings

# (level, option, value) triples for setsockopt.
SocketOptions = tuple[tuple[int, int, int], ...]


def keepalive_options(settings: Settings) -> SocketOptions:
    """What ``settings`` ask of each TCP socket; 0 for a tcp_keep* value leaves the kernel's
    default (net.ipv4.tcp_keepalive_time, _intvl, _probes)."""
    if not settings.tcp_keepalive:
        return ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0),)
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (
        ("TCP_KEEPIDLE", settings.tcp_keepidle),
        ("TCP_KEEPINTVL", settings.tcp_keepintvl),
        ("TCP_KEEPCNT", settings.tcp_keepcnt),
    ):
        if value and hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return tuple(options)


def apply(transport: asyncio.BaseTransport, options: SocketOptions) -> None:
    """Set ``options`` on the transport's socket (a TCP one: a Unix socket has none)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, option, value in options:
        sock.setsockopt(level, option, value)
