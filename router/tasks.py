"""Background tasks owned by a component: stop them the same way everywhere."""

from __future__ import annotations

import asyncio

# A task still running this long after cancel() is cancelled again, and again. Python 3.11's
# asyncio.wait_for returns the result of a future that completed in the same loop iteration as
# a cancel() of its caller, and the cancel is lost (CPython gh-86296, fixed in 3.12 by building
# wait_for on asyncio.timeout). redis-py sends every command through wait_for, so now and then
# the one cancel of a Redis follower (router/registry/invalidation.py) vanished during a PING,
# and the follower, which reconnects and retries by itself, ran on for ever: Router.stop()
# never returned. Long enough for the quick cleanup our tasks do when cancelled (closing a
# socket); a task that must finish a longer cleanup has to shield it.
RECANCEL_INTERVAL = 0.5


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel ``task`` and wait for it to end, cancelling it again every RECANCEL_INTERVAL
    seconds while it runs on (a lost cancel, see above). Re-raises what killed it, if anything,
    and the cancellation of the *calling* task, but not the cancellation this call asked for."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=RECANCEL_INTERVAL)
    if not task.cancelled():
        task.result()  # what killed it, if anything
