"""Running the router for tests: in-process on its own event-loop thread, or as a real
`pgrouter run` subprocess. Each gets its settings as an object or a file; nothing is read
from the test process's environment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from router.app import Router
from router.config import Settings


class RouterThread:
    """A Router on a uvloop event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = uvloop.new_event_loop()
        self.router: Router | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="pgrouter", daemon=True)

    def start(self) -> RouterThread:
        self._thread.start()
        self.router = Router(self.settings)
        self.run(self.router.start())
        return self

    def run(self, coro, timeout: float = 30.0) -> Any:
        """Run a coroutine on the router's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[Router], Any], timeout: float = 10.0) -> Any:
        """Call ``fn(router)`` on the router's loop (its state is not thread-safe)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def invoke() -> None:
            try:
                fut.set_result(fn(self.router))
            except BaseException as exc:  # handed back to the test thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return fut.result(timeout)

    @property
    def port(self) -> int:
        assert self.router is not None and self.router.port is not None
        return self.router.port

    def dsn(self, user: str, password: str | None = None, dbname: str = "app", **params: str) -> str:
        auth = user if password is None else f"{user}:{password}"
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}" + (f"?{query}" if query else "")

    def pool_stats(self) -> dict[str, dict[str, int]]:
        return self.call(lambda r: {p.name: p.stats() for p in r.pools.pools.values()})

    def wait_for(self, predicate: Callable[[Router], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call(predicate):
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        if self.loop.is_closed():
            return  # stopped already (a test stopped it; then the fixture)
        if self.router is not None:
            try:
                self.run(self.router.stop())
            finally:
                self.router = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class RouterProcess:
    """`pgrouter run --config FILE` as a child process."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path = config_path.with_suffix(".log")

    def start(self, timeout: float = 20.0) -> RouterProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGROUTER_")}
        env.update(self.env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router", "run", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return self
        self.stop()
        raise RuntimeError(f"router did not start: {self.log_path.read_text()[-2000:]}")

    def dsn(self, user: str, password: str | None = None, dbname: str = "app") -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def rss_peak_kib(self) -> int:
        """Peak resident set size of the router process (VmHWM)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def login_error(conninfo: str) -> tuple[str | None, str]:
    """The SQLSTATE and message a login fails with (asyncpg reports the server's code), or
    (None, "connected")."""

    async def attempt() -> tuple[str | None, str]:
        import asyncpg

        try:
            conn = await asyncpg.connect(conninfo)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, str(exc)
        await conn.close()
        return None, "connected"

    return asyncio.run(attempt())


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write a (nested) dict as TOML; enough for our configuration files."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str | Path):
            return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
        raise TypeError(type(v))

    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for key, v in data.items():
        if isinstance(v, dict):
            tables.append((key, v))
        elif v is not None:
            lines.append(f"{key} = {value(v)}")
    for key, table in tables:
        for name, sub in table.items():
            lines.append(f'\n[{key}."{name}"]')
            for k, x in sub.items():
                if x is not None:
                    lines.append(f"{k} = {value(x)}")
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # fail here, not in the router, if we wrote bad TOML
    path.write_text(text)
    return path
