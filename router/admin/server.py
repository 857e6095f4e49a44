"""Running the admin API: uvicorn on the router's own event loop.

One loop, so the API reads and changes router state (clients, gates, pools) without crossing
threads. Its listening socket is bound here, before uvicorn starts, so that a port in use fails
``serve()`` with an OSError the router reports, instead of uvicorn calling sys.exit() inside a
task, and so that ``port`` is known at once when the settings ask for port 0.

uvicorn must not touch signals: the router owns SIGINT/SIGTERM (cli.py) and stops the API
through ``AdminServer.stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn

from router.admin.app import create_app
from router.tasks import cancel_and_wait

if TYPE_CHECKING:
    from router.app import Router

log = logging.getLogger("pgrouter.admin")

# Seconds stop() lets requests in progress finish (a DELETE may wait tenant_drop_timeout)
# before they are cancelled.
GRACEFUL_STOP = 5.0
STARTUP_TIMEOUT = 10.0
LISTEN_BACKLOG = 128


class _Server(uvicorn.Server):
    """uvicorn without its signal handling."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


class AdminServer:
    """The admin API listening on ``host:port``. ``start()`` once in the router's loop, then
    ``stop()``."""

    def __init__(self, router: Router, **app_options: Any) -> None:
        settings = router.settings
        self.host = settings.admin_host
        self.requested_port = settings.admin_port
        self.app = create_app(router, **app_options)
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("AdminServer already started")
        sock = _bind(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            loop="none",
            lifespan="off",
            log_config=None,  # uvicorn's loggers propagate to the router's handlers and format
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_STOP,
            backlog=LISTEN_BACKLOG,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[sock]), name="admin-api"
        )
        self._task.add_done_callback(_log_if_failed)
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                while not self._server.started:
                    if self._task.done():
                        self._task.result()  # raises what stopped it
                        raise RuntimeError("admin API stopped while starting")
                    await asyncio.sleep(0.01)  # uvicorn offers no event for "started"
        except BaseException:
            await self.stop()
            sock.close()
            raise
        log.info("admin API listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish (up to GRACEFUL_STOP), close."""
        task, self._task = self._task, None
        if task is None:
            return
        assert self._server is not None
        self._server.should_exit = True
        try:
            # uvicorn's own shutdown is bounded by GRACEFUL_STOP; this is the backstop.
            async with asyncio.timeout(GRACEFUL_STOP + 5.0):
                await asyncio.shield(task)
        except TimeoutError:
            await cancel_and_wait(task)
        except Exception:
            return  # _log_if_failed logged it when it happened


async def serve(router: Router, **app_options: Any) -> AdminServer:
    """Start the admin API of ``router`` on settings.admin_host:admin_port (0: a free port,
    then see ``.port``). Called by Router.start() when admin_port >= 0; Router.stop() awaits
    ``stop()`` on the result. ``app_options`` go to create_app (provision_dsn, ...)."""
    server = AdminServer(router, **app_options)
    await server.start()
    return server


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _log_if_failed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("admin API stopped by an error", exc_info=exc)
