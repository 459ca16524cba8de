"""The bounds of a replay: the settings (:class:`ReplayBounds`) and the in-flight bound
whose waiters give up at a deadline (:class:`InFlightBound`).

Why not :class:`asyncio.Semaphore`: the replay must wait for a slot only until a request's
due time plus a tolerance, and must never lose or leak a slot when a waiter times out or
is cancelled at the same moment a slot is handed to it.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

from patinox.errors import ConfigurationError

__all__ = ["DEFAULT_BOUNDS", "InFlightBound", "ReplayBounds"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayBounds:
    """How far a replay lets a server that cannot keep up hold it back.

    The replay stays open-loop (a request is due at its trace time whatever happened to
    earlier ones) and bounded: it never holds more than these many requests in flight, and
    a request that cannot be sent in time is dropped and counted instead of queued.

    Attributes:
        max_in_flight: most requests sent and not yet finished, over all tenants (>= 1).
        max_in_flight_per_tenant: most in flight for one tenant (>= 1). Each tenant has its
            own HTTP client whose pool has this many connections (at most
            ``max_in_flight``), so a request handed to the client never waits for a
            connection behind another tenant's requests.
        late_tolerance_s: wall seconds (>= 0) a request may leave after its due time. A
            request with no free slot waits for one until then and is ``dropped`` if none
            comes; one sent later than this all the same (its slot came free in time but the
            busy event loop sent it a moment later, or the replay fell behind its schedule)
            is counted ``late``.
        drain_timeout_s: wall seconds (>= 0) the replay waits after the last request's due
            time for answers; requests still in flight then are cancelled (``unfinished``).
            The run so ends ``trace_duration_s / compression + drain_timeout_s`` after it
            started, plus the moment it takes to cancel and close connections.

    Raises:
        ConfigurationError: a bound below 1 or not an integer, a negative or non-finite
            number of seconds.
    """

    max_in_flight: int = 256
    max_in_flight_per_tenant: int = 64
    late_tolerance_s: float = 1.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_in_flight_per_tenant"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, not {value!r}")
        for name in ("late_tolerance_s", "drain_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"{name} must be finite and >= 0, not {value!r}")

    @property
    def pool_size(self) -> int:
        """Connections (and requests in flight) per tenant: the smaller of the two bounds."""
        return min(self.max_in_flight, self.max_in_flight_per_tenant)


DEFAULT_BOUNDS = ReplayBounds()
"""The bounds of a replay given none."""


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
