"""`pgrouter run` with ``workers = N`` (N > 1): this process starts N workers and serves no
client itself.

Each worker is `pgrouter run` again, with its index: a whole router (pools, topology monitors,
registry cache) that binds the client port with SO_REUSEPORT, so the kernel spreads new
connections between them. Worker 0 alone serves the admin API. A configured port 0 is resolved
by worker 0 first; the others then bind the port it got.

The supervisor forwards SIGTERM/SIGINT (drain, then exit) and SIGHUP (reload) to the workers,
and passes their stdout through. It prints its own "pgrouter listening on host:port" once every
worker listens, and exits 0 when all of them stopped cleanly. A worker that exits on its own
is logged and started again after RESTART_DELAY; one that fails MAX_RESTARTS times within
RESTART_WINDOW seconds (it cannot start: a port taken, a bad setting) stops the router, exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from router.config import Settings

log = logging.getLogger("pgrouter.workers")

READY_TIMEOUT = 60.0  # seconds for a worker to listen (topology checks, registry sync first)
RESTART_DELAY = 1.0  # a crashing worker is not restarted in a tight loop
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
LISTENING = re.compile(rb"^pgrouter listening on (.*):(\d+)\s*$")


class Worker:
    """One worker process and the task that reads its output and waits for it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.watcher: asyncio.Task | None = None
        self.ready: asyncio.Future[int] | None = None  # the port, once it listens
        self.restarts: list[float] = []
        self.returncode: int | None = None


class Supervisor:
    def __init__(self, config_path: str | None, settings: Settings) -> None:
        self.config_path = config_path
        self.settings = settings
        self.count = settings.workers
        self.workers = [Worker(i) for i in range(self.count)]
        self.runtime_dir: Path | None = None
        self.port = settings.listen_port
        self.started = False  # every worker listened once
        self.stopping = False
        self.failed = False
        self._stopped = asyncio.Event()

    def command(self, index: int) -> list[str]:
        argv = [sys.executable, "-m", "router", "run"]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv + [
            "--worker", str(index), "--worker-count", str(self.count),
            "--worker-dir", str(self.runtime_dir), "--worker-port", str(self.port),
        ]  # fmt: skip

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="pgrouter-workers-"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        try:
            if not await self._start_all():
                self.failed = True
                self.stop()
            else:
                self.started = True
                host = self.settings.listen_host
                print(f"pgrouter listening on {host}:{self.port} ({self.count} workers)", flush=True)
            await self._stopped.wait()
            await asyncio.gather(*(w.watcher for w in self.workers if w.watcher is not None))
        finally:
            for w in self.workers:  # only if something above failed: nothing is left running
                if w.proc is not None and w.proc.returncode is None:
                    w.proc.kill()
                    await w.proc.wait()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        clean = all(w.returncode == 0 for w in self.workers)
        return 0 if clean and not self.failed else 1

    async def _start_all(self) -> bool:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                if self.port == 0:  # worker 0 picks the port the others join
                    self.port = await self._start(self.workers[0])
                    rest = self.workers[1:]
                else:
                    rest = self.workers
                await asyncio.gather(*(self._start(w) for w in rest))
            return True
        except (RuntimeError, TimeoutError) as exc:
            log.error("workers did not start: %s", exc or "timed out")
            return False

    async def _start(self, worker: Worker) -> int:
        """Start a worker and its watcher; the port once it listens."""
        await self._spawn(worker)
        worker.watcher = asyncio.get_running_loop().create_task(self._watch(worker))
        assert worker.ready is not None
        return await asyncio.shield(worker.ready)

    async def _spawn(self, worker: Worker) -> None:
        worker.ready = asyncio.get_running_loop().create_future()
        worker.proc = await asyncio.create_subprocess_exec(
            *self.command(worker.index), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
        )

    async def _watch(self, worker: Worker) -> None:
        """Pass the worker's output through until it exits; restart it unless stopping."""
        while True:
            proc = worker.proc
            assert proc is not None and proc.stdout is not None and worker.ready is not None
            async for line in proc.stdout:
                match = LISTENING.match(line)
                if match and not worker.ready.done():
                    worker.ready.set_result(int(match.group(2)))
                    continue
                with contextlib.suppress(OSError):  # nobody reads our output: supervise on
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
            worker.returncode = await proc.wait()
            if not worker.ready.done():
                worker.ready.set_exception(
                    RuntimeError(f"worker {worker.index} exited ({worker.returncode}) before listening")
                )
                worker.ready.exception()  # retrieved here: _start_all reports it
                if not self.started:
                    return
            if self.stopping:
                return
            log.error("worker %d (pid %d) exited with %s; restarting it", worker.index, proc.pid, worker.returncode)
            now = time.monotonic()
            worker.restarts = [t for t in worker.restarts if now - t < RESTART_WINDOW] + [now]
            if len(worker.restarts) > MAX_RESTARTS:
                log.error("worker %d failed %d times within %gs: stopping", worker.index, MAX_RESTARTS, RESTART_WINDOW)
                self.failed = True
                self.stop()
                return
            await asyncio.sleep(RESTART_DELAY)
            if self.stopping:
                return
            await self._spawn(worker)  # this loop reads its output and sees it exit again

    def stop(self) -> None:
        """Every worker drains and exits (SIGTERM); run() returns once they all have."""
        if not self.stopping:
            self.stopping = True
            self._signal_all(signal.SIGTERM)
        self._stopped.set()

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)


def supervise(config_path: str | None, settings: Settings) -> int:
    """Run the workers until SIGTERM/SIGINT; the exit status."""
    return asyncio.run(Supervisor(config_path, settings).run())


def die_with_supervisor() -> None:
    """In a worker: receive SIGTERM if the supervisor dies (Linux PR_SET_PDEATHSIG), so that a
    killed supervisor leaves no worker holding the port."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM is the only way
        pass
