"""The channel followers (router/registry/invalidation.py ``follow``: the tenant cache's and the
cancel relay's) end when they are stopped, whatever Redis is doing, and give back what a failed
subscription took. Real redis-servers; a stalled one is SIGSTOPped, a dead one SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from router.config import Settings
from router.frontend.cancel import CancelRelay
from router.registry.cache import TenantCache
from router.registry.errors import RegistryUnavailable
from router.registry.store import RedisStore
from tests.harness import RouterThread
from tests.registry.conftest import RedisServer, eventually

# Seconds a stop may take: the followers' own timeouts are 2 s at most, and a lost cancel is
# repeated after router.tasks.RECANCEL_INTERVAL (0.5 s). Before that, a stop could hang for ever.
STOP_DEADLINE = 5.0
SETUP_DEADLINE = 15.0  # for Redis, a router, a follower to get going on a loaded machine


@pytest.fixture
def stalled(redis_server: RedisServer) -> Iterator[Callable[[], None]]:
    """Call it to freeze the test's redis-server (SIGSTOP): connections stay open, nothing is
    answered. It is thawed (and then killed by the redis_server fixture) after the test."""
    frozen = []

    def stall() -> None:
        os.kill(redis_server.pid, signal.SIGSTOP)
        frozen.append(redis_server.pid)

    yield stall
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)


def established_to(port: int) -> int:
    """This process's open TCP connections to ``port`` (the kernel's view, not redis-py's)."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def owner_of_follower(kind: str, store: RedisStore) -> CancelRelay | TenantCache:
    if kind == "cancel-relay":
        return CancelRelay(store, lambda pid, key: None)
    return TenantCache(store)


@pytest.mark.parametrize("kind", ["cancel-relay", "tenant-cache"])
async def test_stop_ends_a_follower_whose_cancel_was_lost(store: RedisStore, kind: str) -> None:
    # Python 3.11's asyncio.wait_for drops a cancel that arrives in the loop iteration in which
    # the future it waits for completed (CPython gh-86296), and redis-py writes every command
    # through wait_for(_send_packed_command(...)). Here the owner's stop() is started exactly
    # then, while the follower sends its PING, as happened by chance in a full test run.
    owner = owner_of_follower(kind, store)
    owner.start()
    follower = next(t for t in asyncio.all_tasks() if t.get_name() == kind)
    if isinstance(owner, CancelRelay):
        await asyncio.wait_for(owner.subscribed.wait(), SETUP_DEADLINE)
    else:
        await owner.wait_synced(SETUP_DEADLINE)

    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def task_factory(loop, coro, **kwargs):
        task = asyncio.Task(coro, loop=loop, **kwargs)
        command_written = getattr(coro, "__name__", "") == "_send_packed_command"
        if command_written and not stopping and asyncio.current_task(loop) is follower:
            # Runs before wait_for's own callback, so the cancel meets a finished future.
            task.add_done_callback(lambda _: stopping.append(loop.create_task(owner.stop())))
        return task

    loop.set_task_factory(task_factory)
    try:
        await eventually(lambda: bool(stopping), SETUP_DEADLINE, "the follower's next PING (one a second)")
    finally:
        loop.set_task_factory(None)
    started = time.monotonic()
    try:
        await asyncio.wait_for(stopping[0], STOP_DEADLINE)
    except TimeoutError:
        follower.cancel()  # let the fixtures close the store
        pytest.fail(f"{kind}: stop() did not end its follower within {STOP_DEADLINE}s")
    assert follower.done()
    print(f"{kind} stopped {time.monotonic() - started:.2f}s after the lost cancel")


async def test_failed_subscribe_gives_its_connection_back(
    redis_server: RedisServer, stalled: Callable[[], None], open_store: Callable[..., RedisStore]
) -> None:
    store = open_store()  # its socket_timeout (2 s) is how long a confirmation is awaited
    await store.ping()  # one pooled connection, logged in (HELLO) while Redis still answered
    assert established_to(redis_server.port) == 1
    stalled()
    # The subscription takes that connection and sends SUBSCRIBE; no confirmation comes.
    with pytest.raises(RegistryUnavailable, match="no SUBSCRIBE confirmation"):
        async with store.subscribe():
            pass
    # Closed (the transport lets go of the socket a loop iteration later), not left checked
    # out of the pool, one more per reconnection attempt.
    await eventually(lambda: established_to(redis_server.port) == 0, STOP_DEADLINE, "the connection closed")


def router_settings(redis_url: str) -> Settings:
    from router.registry.crypto import generate_key

    return Settings(
        redis_url=redis_url, secret_key=f"k1:{generate_key()}", admin_port=-1, listen_port=0
    )


@pytest.mark.parametrize("redis_fails", ["stalled", "killed"])
def test_router_stops_promptly_when_redis_fails(
    redis_server: RedisServer, stalled: Callable[[], None], redis_fails: str
) -> None:
    handle = RouterThread(router_settings(redis_server.url)).start()
    try:
        handle.wait_for(
            lambda r: r.cancel_relay.subscribed.is_set() and not r.tenants.cache.stale,
            timeout=SETUP_DEADLINE,
            what="both followers subscribed",
        )
        if redis_fails == "stalled":
            stalled()
        else:
            redis_server.stop()
        # Both followers have noticed (3 s without a PONG when stalled) and are reconnecting:
        # in a connection attempt or in back-off.
        handle.wait_for(
            lambda r: not r.cancel_relay.subscribed.is_set() and r.tenants.cache.stale,
            timeout=SETUP_DEADLINE,
            what="the followers to notice",
        )
        started = time.monotonic()
        handle.run(handle.router.stop(), timeout=STOP_DEADLINE)
        print(f"Router.stop() took {time.monotonic() - started:.2f}s with Redis {redis_fails}")
    finally:
        handle.router = None  # stopped above, or hung: only end the loop's thread
        handle.stop()
