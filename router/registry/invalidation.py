"""The invalidation channel: what a registry write announces, and one subscription to it.

Each write script ends with ``PUBLISH {prefix}invalidate {"id", "version", "registry_version"
[, "deleted"]}`` (see store.py). Redis pub/sub is fire-and-forget: a subscriber that was
disconnected has missed what was published meanwhile and is not told. So a Subscription ends
loudly (RegistryUnavailable) whenever its connection breaks, and its owner (TenantCache) opens a
new one and compares the registry version before trusting its entries again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster

from router.registry.connect import REDIS_DOWN_ERRORS, RedisConnection
from router.registry.errors import RegistryUnavailable

log = logging.getLogger(__name__)

# Subscriber reconnection: first retry after RECONNECT_MIN s, doubling up to RECONNECT_MAX s.
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One message of the invalidation channel."""

    tenant_id: str
    version: int | None  # the tenant's version after the write; None when it was deleted
    registry_version: int
    deleted: bool = False

    @classmethod
    def parse(cls, data: str | bytes) -> Invalidation:
        """Raises ValueError on anything but the write script's message."""
        try:
            fields = json.loads(data)
            tenant_id, version = fields["id"], fields["version"]
            registry_version = fields["registry_version"]
            deleted = bool(fields.get("deleted", False))
        except (TypeError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"not an invalidation message: {data!r}") from exc
        if not isinstance(tenant_id, str) or not isinstance(registry_version, int):
            raise ValueError(f"not an invalidation message: {data!r}")
        if not (version is None or isinstance(version, int)):
            raise ValueError(f"not an invalidation message: {data!r}")
        return cls(tenant_id, version, registry_version, deleted)


class Subscription:
    """One connection subscribed to ``channel``, used as ``async with``. ``next()`` raises
    RegistryUnavailable once the connection breaks or stops answering."""

    # A PING every this many quiet seconds; no reply (or message) for three times as long means
    # the connection is dead even if TCP has not noticed (a partition sends no reset).
    PING_INTERVAL = 1.0

    def __init__(
        self,
        connection: RedisConnection,
        channel: str,
        parse: Callable[[str | bytes], Any] | None = None,
    ) -> None:
        self._connection = connection
        self.channel = channel
        # What a message becomes (raises ValueError on a malformed one); invalidations by default.
        self._parse = parse or Invalidation.parse
        self._pubsub: Any = None
        self._last_heard = 0.0
        self._last_ping = 0.0

    async def __aenter__(self) -> Subscription:
        try:
            with self._connection.reaching_redis():
                client = self._connection.client
                if isinstance(client, RedisCluster):
                    await client.initialize()  # its pub/sub needs the slot map; a no-op once done
                self._pubsub = client.pubsub()
                await self._pubsub.subscribe(self.channel)
                # Wait for the confirmation: once it is here the server delivers every later
                # publish to us, so a registry version read after this misses nothing.
                while True:
                    message = await self._pubsub.get_message(timeout=self._connection.socket_timeout)
                    if message is None:
                        raise rex.TimeoutError("no SUBSCRIBE confirmation")
                    if message["type"] == "subscribe":
                        break
        except BaseException:
            # `async with` calls __aexit__ only after a successful __aenter__: without this, a
            # pub/sub connection that was opened but never confirmed (or a cancel) would stay
            # checked out of the pool, one more per reconnection attempt, until close().
            await self.__aexit__()
            raise
        self._last_heard = self._last_ping = asyncio.get_running_loop().time()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except REDIS_DOWN_ERRORS:
                pass  # the connection is gone already; there is nothing left to close

    async def next(self, timeout: float) -> Any:
        """The next invalidation (or what ``parse`` made of the message), or None after ``timeout`` seconds (at most PING_INTERVAL)
        without one."""
        with self._connection.reaching_redis():
            message = await self._pubsub.get_message(timeout=min(timeout, self.PING_INTERVAL))
            now = asyncio.get_running_loop().time()
            if message is not None:
                self._last_heard = now
            elif now - self._last_heard > 3 * self.PING_INTERVAL:
                raise rex.TimeoutError("the pub/sub connection stopped answering PING")
            if now - self._last_ping >= self.PING_INTERVAL:
                self._last_ping = now
                await self._pubsub.ping()
        if message is None or message["type"] != "message":
            return None  # a PONG, or nothing yet
        try:
            return self._parse(message["data"])
        except ValueError:
            log.warning("ignored a malformed message on %s: %r", self.channel, message)
            return None


async def follow(
    subscribe: Callable[[], Subscription],
    on_connected: Callable[[], Awaitable[None]],
    on_message: Callable[[Any], Awaitable[None]],
    on_lost: Callable[[Exception], None],
) -> None:
    """Follow a channel for good: subscribe, await ``on_connected``, hand every message to
    ``on_message``; when Redis goes away, call ``on_lost`` and subscribe again after a delay
    that doubles from RECONNECT_MIN to RECONNECT_MAX (reset by each successful subscribe).
    Only a cancel ends it: stop its task with router.tasks.cancel_and_wait, which cancels
    again when redis-py has lost a cancel (Python 3.11's wait_for; see there)."""
    delay = RECONNECT_MIN
    while True:
        try:
            async with subscribe() as subscription:
                await on_connected()
                delay = RECONNECT_MIN
                while True:
                    message = await subscription.next(timeout=Subscription.PING_INTERVAL)
                    if message is not None:
                        await on_message(message)
        except RegistryUnavailable as exc:
            on_lost(exc)
        except Exception as exc:
            # Anything else is a lost connection too: redis-py's reconnect over uvloop can
            # raise RuntimeError ("the handler is closed") when the server dies mid-write.
            # Ending here would stop following for good (no more cancel relay, no more
            # invalidations) while the router runs on.
            log.warning("pub/sub connection lost on an unexpected error; subscribing again", exc_info=exc)
            on_lost(exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX)
