"""router.tasks.cancel_and_wait: how every owner stops its background task."""

from __future__ import annotations

import asyncio

import pytest

from router.tasks import RECANCEL_INTERVAL, cancel_and_wait


async def test_a_lost_cancel_is_repeated() -> None:
    # As a redis-py follower on Python 3.11: its first cancel vanishes (in asyncio.wait_for),
    # and it would go on retrying for ever.
    lost = []

    async def follower() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost.append(True)

    task = asyncio.create_task(follower())
    await asyncio.sleep(0)
    async with asyncio.timeout(RECANCEL_INTERVAL * 10):
        await cancel_and_wait(task)
    assert lost and task.cancelled()


async def test_reraises_what_killed_the_task_and_ignores_none() -> None:
    async def broken() -> None:
        raise ValueError("bug")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="bug"):
        await cancel_and_wait(task)
    await cancel_and_wait(None)


async def test_the_callers_own_cancellation_propagates() -> None:
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass  # ignores cancels until released

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.01)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    released.set()
    await task
