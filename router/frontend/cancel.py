"""Where a CancelRequest goes when the client that holds its key is not connected here.

A CancelRequest arrives on a connection of its own (protocol docs, "Canceling Requests in
Progress"), so with several workers behind one port, or several router instances behind a load
balancer, it often lands on a process other than the one serving the query. Each worker issues
BackendKeyData process ids congruent to its index modulo the number of workers
(``issue_pid``), so any worker knows which sibling issued a key and hands the request to it over
that sibling's control socket (router/workers/control.py). A key this instance does not know
is relayed to the other instances through Redis pub/sub (``CancelRelay``, when a tenant
registry is configured); the instance that issued it cancels, everyone else ignores it, as
PostgreSQL ignores an unknown key.

What became of each CancelRequest a worker received is counted by outcome:
``local`` (cancelled, or the client was idle), ``forwarded`` (to the sibling that issued the
key), ``relayed`` (published for the other instances), ``unknown`` (nobody to ask: ignored).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable
from enum import StrEnum

from router.registry.errors import RegistryUnavailable
from router.registry.invalidation import follow
from router.registry.store import RedisStore
from router.tasks import cancel_and_wait

log = logging.getLogger("pgrouter.cancel")

RELAY_CHANNEL = "cancel"  # published as {registry_prefix}cancel
MAX_PID = 0x7FFFFFFF  # BackendKeyData's process id is an Int32; clients treat it as signed


class CancelOutcome(StrEnum):
    LOCAL = "local"
    FORWARDED = "forwarded"
    RELAYED = "relayed"
    UNKNOWN = "unknown"


def issue_pid(index: int, count: int, taken: Callable[[int], bool]) -> int:
    """A fresh non-zero process id ≡ ``index`` (mod ``count``) for BackendKeyData."""
    while True:
        pid = secrets.randbelow(MAX_PID // count) * count + index
        if pid and not taken(pid):
            return pid


def encode_relayed(pid: int, key: int) -> str:
    return json.dumps({"pid": pid, "key": key})


def decode_relayed(data: str | bytes) -> tuple[int, int]:
    """Raises ValueError on anything but a relayed CancelRequest."""
    try:
        fields = json.loads(data)
        pid, key = fields["pid"], fields["key"]
    except (TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a relayed CancelRequest: {data!r}") from exc
    if not (isinstance(pid, int) and isinstance(key, int) and 0 <= pid <= 0xFFFFFFFF and 0 <= key <= 0xFFFFFFFF):
        raise ValueError(f"not a relayed CancelRequest: {data!r}")
    return pid, key


class CancelRelay:
    """Cancels between router instances over ``{registry_prefix}cancel``: ``publish()`` a key
    nobody here issued; every subscribed worker hands what arrives to ``apply(pid, key)``,
    which cancels only a key it issued. Redis pub/sub delivers at most once: a cancel published
    while a subscriber is reconnecting is lost, as a CancelRequest to a busy postmaster may be.
    The key travels in the clear: Redis is trusted as the registry's store already is."""

    def __init__(self, store: RedisStore, apply: Callable[[int, int], None]) -> None:
        self.store = store
        self.apply = apply
        self._task: asyncio.Task | None = None
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="cancel-relay")
        self._task.add_done_callback(_log_if_failed)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def publish(self, pid: int, key: int) -> None:
        try:
            await self.store.publish(RELAY_CHANNEL, encode_relayed(pid, key))
        except RegistryUnavailable as exc:
            log.warning("could not relay a CancelRequest: %s", exc)

    async def _follow(self) -> None:
        await follow(
            lambda: self.store.subscribe_to(RELAY_CHANNEL, decode_relayed),
            self._connected,
            self._relayed,
            self._lost,
        )

    async def _connected(self) -> None:
        self.subscribed.set()

    async def _relayed(self, message: tuple[int, int]) -> None:
        self.apply(*message)

    def _lost(self, exc: Exception) -> None:
        if self.subscribed.is_set():
            log.warning("cancel relay lost Redis, reconnecting: %s", exc)
        self.subscribed.clear()


def _log_if_failed(task: asyncio.Task) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("cancel relay stopped by an error", exc_info=exc)
