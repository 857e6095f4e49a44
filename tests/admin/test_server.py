"""serve() / AdminServer: uvicorn in the caller's event loop, on a port of its own choosing when
asked for 0, without touching signal handlers, and closed by stop()."""

from __future__ import annotations

import signal
import socket

import httpx
import pytest

from router.admin.server import serve
from router.app import Router
from router.config import Settings


def _router(**settings: object) -> Router:
    # Not started: the API serves it all the same (/readyz says it is not listening).
    return Router(Settings(**{"admin_port": 0, "admin_token": "t", "listen_port": 0, **settings}))


async def test_port_zero_signals_untouched_and_stop_closes() -> None:
    # This test runs in the main thread, where uvicorn would install its own SIGINT/SIGTERM
    # handlers for as long as it serves; the router owns those signals.
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = await serve(_router())
    try:
        assert server.port and server.port > 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["listener"] == "not listening"
        assert {sig: signal.getsignal(sig) for sig in before} == before
    finally:
        await server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    await server.stop()  # a second stop is harmless


async def test_a_port_in_use_fails_serve() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await serve(_router(admin_port=port))
