"""A bound on requests in flight whose waiters give up at a deadline.

Why not :class:`asyncio.Semaphore`: the replay must wait for a slot only until a request's
due time plus a tolerance, and must never lose or leak a slot when a waiter times out or
is cancelled at the same moment a slot is handed to it.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["InFlightBound"]


class InFlightBound:
    """At most ``limit`` holders at once; waiters are served first come, first served.

    Only touched from one event loop. ``peak`` is the most holders seen at once.
    """

    __slots__ = ("_waiters", "limit", "peak", "used")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()

    async def take(self, give_up: float) -> bool:
        """Hold one slot, waiting at most until ``give_up``.

        Args:
            give_up: event-loop time (:meth:`asyncio.AbstractEventLoop.time`, seconds) after
                which to stop waiting; a time already past means "only if free now".

        Returns:
            True when a slot is held (release it with :meth:`give`), False when none came
            free in time. When the caller is cancelled while waiting it holds no slot.
        """
        if self.used < self.limit and not self._waiters:
            self.used += 1
            self.peak = max(self.peak, self.used)
            return True
        loop = asyncio.get_running_loop()
        if loop.time() >= give_up:
            return False
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_at(give_up, _expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.give()  # handed a slot in the same instant as the cancellation
            raise
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def give(self) -> None:
        """Release one held slot, handing it to the longest waiter if there is one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot passes on; ``used`` is unchanged
                return
        self.used -= 1


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
