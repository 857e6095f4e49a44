"""Fixtures of the registry tests: a redis-server of each test's own (real, from the local
binary, on a free port, in a temporary directory), stopped by its PID; keyrings; stores; and
tenant inputs that are cheap to build (a SCRAM verifier computed once)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from router.protocol.auth import ScramVerifier, scram_verifier
from router.registry.crypto import Keyring, generate_key
from router.registry.models import TenantCreate
from router.registry.store import RedisStore

HOST = "127.0.0.1"
PORT_ATTEMPTS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process. ``stop()`` kills it by PID; ``start()`` again reuses the port
    and the directory (so a dump.rdb written by SAVE is loaded back)."""

    def __init__(
        self,
        directory: Path,
        *args: str,
        config: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.args = list(args)
        self.config = config  # text of a config file (a sentinel's), written before each start
        self.tls = tls  # (certificate, key, CA): then the port speaks TLS only
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://{HOST}:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> RedisServer:
        for _ in range(PORT_ATTEMPTS):
            if self._start_once(timeout):
                return self
            self.port = free_port()  # someone took it between free_port() and bind()
        raise RuntimeError(f"redis-server would not start:\n{self._log_tail()}")

    def _start_once(self, timeout: float) -> bool:
        command = ["redis-server"]
        if self.config is not None:
            path = self.directory / "redis.conf"
            path.write_text(self.config)
            command.append(str(path))
        if self.tls:
            cert, key, ca = self.tls
            command += [
                "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            command += ["--port", str(self.port)]
        command += [
            "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            "--daemonize", "no", "--logfile", str(self.directory / "redis.log"), *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._answers_as_us():
                return True
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout}s:\n{self._log_tail()}")

    def _answers_as_us(self) -> bool:
        # Compare process_id: a PONG alone could come from another server on a reused port.
        try:
            client = self.client()
            try:
                return client.info("server").get("process_id") == self.pid
            finally:
                client.close()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def stop(self, sig: signal.Signals = signal.SIGKILL) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        """A plain synchronous client, for looking at what the store wrote."""
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.tls[2])} if self.tls else {}
        return redis.Redis(
            host=HOST, port=self.port, decode_responses=True, socket_timeout=2, **tls
        )

    def _log_tail(self) -> str:
        log = self.directory / "redis.log"
        return log.read_text()[-2000:] if log.exists() else "(no log)"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def key_spec() -> str:
    """The test keyring's one key, as settings give it: "kid:base64key"."""
    return f"k1:{generate_key()}"


@pytest.fixture
def keyring(key_spec: str) -> Keyring:
    return Keyring.from_specs(key_spec)


@pytest.fixture
async def open_store(
    redis_server: RedisServer, keyring: Keyring
) -> AsyncIterator[Callable[..., RedisStore]]:
    """Make stores (each with its own connections) on the test's Redis; closed at the end."""
    stores: list[RedisStore] = []

    def open_(url: str | None = None, ring: Keyring | None = None, **kwargs: Any) -> RedisStore:
        store = RedisStore.from_url(url or redis_server.url, ring or keyring, **kwargs)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()


@pytest.fixture
def store(open_store: Callable[..., RedisStore]) -> RedisStore:
    return open_store()


_VERIFIER: str | None = None


def verifier() -> str:
    """A SCRAM verifier of "alice-pw", computed once (4096 PBKDF2 rounds are not free)."""
    global _VERIFIER
    if _VERIFIER is None:
        _VERIFIER = scram_verifier("alice-pw")
    return _VERIFIER


def scram_matches(text: str, password: str) -> bool:
    """RFC 5802 section 3, recomputed here: StoredKey = H(HMAC(SaltedPassword, "Client Key"))."""
    v = ScramVerifier.parse(text)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), v.salt, v.iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest() == v.stored_key


def tenant_input(tenant_id: str | None = None, **overrides: Any) -> TenantCreate:
    data: dict[str, Any] = {
        "tenant_id": tenant_id or f"t-{uuid.uuid4().hex[:12]}",
        "cluster": {
            "primary": {"host": "db1.internal", "port": 5432},
            "replicas": [{"host": "db2.internal", "port": 5432}],
        },
        "database": "app",
        "server_user": "app_owner",
        "server_password": "server-secret",
        "users": [{"name": "alice", "verifier": verifier()}],
    }
    data.update(overrides)
    return TenantCreate.model_validate(data)


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str
) -> float:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds. Returns the time taken.
    Polling with a deadline, not a fixed sleep, is how these tests wait for another party."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start > timeout:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.002)
