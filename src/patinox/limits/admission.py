"""Fair share of a process's own capacity: an adaptive concurrency limit shared by weighted
max-min fairness among the tenants running in the process.

Per-tenant limits (request rate, concurrent runs, tokens) are static: every tenant can be
within its own limits while together they ask more of a process than it can carry, and
then every run of every tenant slows down, the light tenant's as much as the heavy ones'
(a noisy neighbour within the rules). :class:`FairShareAdmission` is the deployment's own
limit, per process:

- **How much the process can carry** is learnt, not set: the concurrency limit ``L`` (runs
  executing at once in this process, synchronous runs and queued runs alike) adapts to
  the event loop's *lag*, the time a ready callback waits before it runs, measured every
  :attr:`AdmissionSettings.probe_s` by a timer that notes how late it fires. Everything a
  run does on the process's CPU (HTTP, the agent loop, SQLite, sealing) runs on that loop,
  so lag is the queueing delay that every run in the process pays; time spent waiting on
  a model or the network adds none. After each window of probes, ``L`` is multiplied by
  the gradient ``sqrt(target / lag)`` (``lag``: the windows' median lags, smoothed),
  bounded to :attr:`AdmissionSettings.increase` up and :attr:`AdmissionSettings.decrease`
  down per window, and raised only while the limit is in use: a delay-based gradient
  controller in the manner of TCP Vegas and Netflix's ``concurrency-limits``
  (``Gradient2Limit``), steering the loop's lag to its target instead of a hand-set
  constant. Runs that only wait on a model cost the loop nothing, so ``L`` grows until the
  process's CPU, not the number of runs, is what is scarce; the target trades a light
  tenant's latency (every step of its run waits out the lag) against the heavy tenants'
  throughput (a lag near zero leaves the CPU idle).
- **Who gets it** is weighted max-min fair: a tenant's share is ``L * w / W``, its plan
  weight ``w`` over the weights ``W`` of the tenants with runs executing or waiting here.
  A tenant under its share is admitted at once, within a headroom over ``L``
  (:attr:`AdmissionSettings.headroom`; runs cannot be pre-empted, so a tenant arriving
  while others borrowed every slot still starts now). Capacity nobody else wants is lent
  (work-conserving): below ``L`` with nobody waiting, anyone is admitted. Otherwise the
  run waits, at most :attr:`AdmissionSettings.max_wait_s`, and every freed slot goes to the
  waiting tenant with the fewest runs per unit of weight; a run still waiting at its
  deadline is refused with :class:`~patinox.errors.Overloaded` (``503 overloaded``) and an
  estimate of when the tenant's turn comes as ``retry_after_s``.
- **Worker slots follow the same rule**: a queue worker asks :meth:`FairShareAdmission.claimable`
  which tenants it may claim a run of now, and counts the claimed run with
  :meth:`FairShareAdmission.take`.

Each process (API server or ``patinox worker``) learns its own capacity and shares it among
the tenants active in it; nothing is coordinated across processes. Everything here runs
on one event loop and never awaits between a decision and its bookkeeping, so it needs no
lock.

Sources: L. S. Brakmo and L. L. Peterson, "TCP Vegas: end to end congestion avoidance on a
global Internet", IEEE JSAC 13(8), 1995; Netflix, concurrency-limits (GitHub,
``Gradient2Limit``, ``VegasLimit``); D. Bertsekas and R. Gallager, *Data Networks*, 6.5.2
(max-min fairness).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from patinox.errors import Overloaded
from patinox.limits.fair_loop import flow_scope, ready_queue

__all__ = ["AdmissionSettings", "FairShareAdmission"]


@dataclass(frozen=True, kw_only=True)
class AdmissionSettings:
    """Tuning of :class:`FairShareAdmission`; the defaults suit an API or worker process.

    Attributes:
        enabled: False admits every run at once (the runs are still counted): for
            benchmarks that measure the process without it, and for emergencies.
        initial_limit: ``L`` at start, runs.
        min_limit: ``L`` never goes below this, runs.
        max_limit: ``L`` never goes above this, runs (each run in flight holds memory).
        target_lag_s: event-loop lag the limit steers to on a first-come-first-served
            loop, seconds (the median lag of a timer in a window, smoothed over windows):
            every step of every run, a light tenant's too, waits about this long.
        fair_target_lag_s: the same on a tenant-fair loop
            (:mod:`patinox.limits.fair_loop`), where the lag is that of the loop's backlog
            (ready callbacks times the mean time of one): what every step of a run of the
            busiest tenants waits, while a light tenant's steps wait one turn of each
            active tenant instead, so the loop may run fuller.
        target_storage_wait_s: mean time a storage call may wait for a storage thread
            (:class:`~patinox.limits.FairStorageExecutor`, PostgreSQL) that the limit steers
            to, seconds: calls wait only while every thread is busy, and then a run admitted
            more only lengthens the queue in front of the database.
        probe_s: how often the lag is sampled, seconds.
        window: probes per adjustment of ``L``.
        smoothing: weight of the newest window in the smoothed lag (1: no smoothing).
        busy_floor: ``L`` falls only in a window in which the loop's thread computed at
            least this fraction of the time (0-1); see :meth:`FairShareAdmission.adjust`.
        increase: most ``L`` grows in one adjustment, as a fraction of ``L``.
        decrease: most ``L`` shrinks in one adjustment, as a fraction of ``L``.
        headroom: fraction of ``L`` (at least one run) by which tenants under their share
            may exceed ``L``.
        max_wait_s: longest a run waits for its turn before ``503 overloaded``, seconds.
    """

    enabled: bool = True
    initial_limit: int = 32
    min_limit: int = 16
    max_limit: int = 1024
    target_lag_s: float = 0.005
    fair_target_lag_s: float = 0.025
    target_storage_wait_s: float = 0.010
    probe_s: float = 0.020
    window: int = 5
    smoothing: float = 0.3
    busy_floor: float = 0.8
    increase: float = 0.10
    decrease: float = 0.10
    headroom: float = 0.25
    max_wait_s: float = 2.0


@dataclass(eq=False, slots=True)
class _Tenant:
    weight: int
    running: int = 0
    waiters: deque[_Waiter] = field(default_factory=deque)


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[None]
    since: float


class FairShareAdmission:
    """Admits runs into this process by weighted max-min fair share of an adaptive limit.

    See the module docstring. A run enters with ``async with admission.slot(tenant_id,
    weight)`` (or :meth:`try_admit`, then :meth:`admit` to wait for its turn, and
    :meth:`release` once it ended); a worker uses :meth:`claimable` and :meth:`take`.
    :meth:`watch` adapts the limit; without it the limit stays at
    :attr:`AdmissionSettings.initial_limit`.
    """

    def __init__(self, settings: AdmissionSettings | None = None) -> None:
        self.settings = s = settings or AdmissionSettings()
        self._limit = float(min(max(s.initial_limit, s.min_limit), s.max_limit))
        self._cap = int(self._limit)  # int(L), runs
        self._headroom = self._headroom_for(self._cap)
        self._tenants: dict[str, _Tenant] = {}
        self._weights = 0  # sum of the weights of the tenants in _tenants
        self._waiting = 0  # runs waiting, all tenants
        self.running = 0  # runs admitted and not yet released, all tenants
        self._peak = 0  # most runs at once in the current window
        self._released = 0  # runs released, ever (for the completion rate)
        self._rate = 0.0  # runs released per second, smoothed
        self._on_free: list[Callable[[], object]] = []
        self.lag_s = 0.0  # the lag the last window's adjustment used, seconds
        self.target_lag_s = s.target_lag_s  # the target it steered to, seconds
        self.probe_lag_s = 0.0  # the median lag of the timer probe in the last window, seconds
        self.busy = 0.0  # fraction of the last window the loop's thread was on the CPU
        self._smoothed: float | None = None  # smoothed window lag, seconds
        self._smoothed_wait: float | None = None  # smoothed storage-thread wait, seconds
        self.storage_wait_s: float | None = None  # the last window's storage-thread wait, seconds
        self.refused = 0  # runs refused 503 overloaded, ever

    # -- admission -------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The current concurrency limit ``L``, runs."""
        return self._cap

    def try_admit(self, tenant_id: str, weight: int) -> bool:
        """Admit a run of ``tenant_id`` (plan weight ``weight``) now if its turn is now.

        Returns:
            True when admitted (call :meth:`release` when the run ends); False when the
            run must wait (:meth:`admit`).
        """
        if not self.settings.enabled or (self.running < self._cap and not self._waiting):
            self._count(tenant_id, weight)
            return True
        t = self._tenants.get(tenant_id)
        if self.running < self._cap + self._headroom and self._under_share(t, weight):
            self._count(tenant_id, weight)
            return True
        return False

    async def admit(self, tenant_id: str, weight: int, *, max_wait_s: float | None = None) -> None:
        """Admit a run of ``tenant_id``, waiting for its turn at most ``max_wait_s`` seconds
        (default :attr:`AdmissionSettings.max_wait_s`).

        Raises:
            Overloaded: its turn did not come in time (``retry_after_s``: when it may,
                estimated from the process's completion rate and the tenant's share).
        """
        if self.try_admit(tenant_id, weight):
            return
        t = self._enter(tenant_id, weight)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), time.monotonic())
        t.waiters.append(waiter)
        self._waiting += 1
        wait_s = self.settings.max_wait_s if max_wait_s is None else max_wait_s
        handle = loop.call_later(wait_s, _expire, waiter.future)
        try:
            await waiter.future
        except _Expired:
            self._drop_waiter(tenant_id, t, waiter)
            self.refused += 1
            raise Overloaded(
                "this deployment is at capacity and this tenant has its fair share of it; retry later",
                tenant_id=tenant_id,
                retry_after_s=self._eta(t, weight),
                waited_s=round(time.monotonic() - waiter.since, 3),
                limit=self._cap,
                running=self.running,
            ) from None
        except BaseException:
            f = waiter.future
            if f.done() and not f.cancelled() and f.exception() is None:
                self.release(tenant_id)  # granted, then the caller went away
            else:
                self._drop_waiter(tenant_id, t, waiter)
            raise
        finally:
            handle.cancel()

    def slot(self, tenant_id: str, weight: int) -> _Slot:
        """``async with admission.slot(tenant_id, weight):`` runs the block once the run is
        admitted (:meth:`try_admit`, else :meth:`admit`) and releases it after, however the
        block ends.

        Raises:
            Overloaded: on entry, as :meth:`admit`.
        """
        return _Slot(self, tenant_id, weight)

    def release(self, tenant_id: str) -> None:
        """A run of ``tenant_id`` admitted here ended: free its slot (for the next waiting
        run in fair order, or a blocked worker)."""
        t = self._tenants.get(tenant_id)
        if t is None or t.running <= 0:
            return  # released twice: never let the counts go negative
        t.running -= 1
        self.running -= 1
        self._released += 1
        if not t.running and not t.waiters:
            self._leave(tenant_id, t)
        if self._waiting:
            self._grant()
        self._notify_free()

    # -- workers ---------------------------------------------------------------------

    def claimable(self) -> frozenset[str] | None:
        """Which queued runs a worker may claim now: ``None`` when none (the process is
        full), otherwise the tenants whose runs it may *not* claim (those at or over their
        share); an empty set means any. A run claimed must be counted with :meth:`take`."""
        if not self.settings.enabled or (self.running < self._cap and not self._waiting):
            return frozenset()
        if self.running >= self._cap + self._headroom:
            return None
        return frozenset(tid for tid, t in self._tenants.items() if not self._under_share(t, t.weight))

    def take(self, tenant_id: str, weight: int) -> None:
        """Count a run a worker claimed as :meth:`claimable` allowed (release it with
        :meth:`release`)."""
        self._count(tenant_id, weight)

    def notify_when_free(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once, at the next release that leaves room for a run (a
        worker that found nothing it may claim waits for this)."""
        self._on_free.append(callback)

    # -- the adaptive limit ------------------------------------------------------------

    async def watch(self, storage_wait: Callable[[], float | None] | None = None) -> None:
        """Sample the event loop's lag and adapt the limit; runs until cancelled.

        Args:
            storage_wait: called once a window, the mean wait of the storage calls taken
                by a storage thread in it, seconds (``None``: none), e.g.
                :meth:`FairStorageExecutor.wait_window
                <patinox.limits.FairStorageExecutor.wait_window>`: the limit also steers
                it to :attr:`AdmissionSettings.target_storage_wait_s`.
        """
        if not self.settings.enabled:
            return
        with flow_scope("lag-probe"):  # on a tenant-fair loop, a flow of its own
            await self._watch(storage_wait)

    async def _watch(self, storage_wait: Callable[[], float | None] | None) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        fair = ready_queue(loop)
        lags: list[float] = []
        backlogs: list[int] = []
        started, released, cpu = loop.time(), self._released, time.thread_time()
        popped = fair.popped if fair is not None else 0
        while True:
            due = loop.time() + s.probe_s
            await asyncio.sleep(s.probe_s)
            lags.append(max(0.0, loop.time() - due))
            if fair is not None:
                backlogs.append(fair.size)
            if len(lags) < s.window:
                continue
            now, cpu_now = loop.time(), time.thread_time()
            wall = max(now - started, 1e-3)
            rate = (self._released - released) / wall
            self._rate = rate if not self._rate else 0.7 * self._rate + 0.3 * rate
            # This coroutine runs on the loop's thread: its CPU time is the loop's.
            busy = (cpu_now - cpu) / wall
            self.probe_lag_s = statistics.median(lags)
            waited = None if storage_wait is None else storage_wait()
            if fair is None:
                self.adjust(self.probe_lag_s, busy=busy, storage_wait_s=waited)
            else:
                # The probe's own lag is one turn of each active tenant, whatever L is; the
                # backlog's is what admitting fewer runs shortens.
                per_callback = (cpu_now - cpu) / max(1, fair.popped - popped)
                backlog_lag = statistics.median(backlogs) * per_callback
                self.adjust(backlog_lag, busy=busy, target_s=s.fair_target_lag_s, storage_wait_s=waited)
                popped = fair.popped
                backlogs.clear()
            lags.clear()
            started, released, cpu = now, self._released, cpu_now

    def adjust(
        self,
        lag_s: float,
        *,
        busy: float = 1.0,
        target_s: float | None = None,
        storage_wait_s: float | None = None,
    ) -> None:
        """One step of the limit for a window whose loop lag was ``lag_s`` seconds and in
        which the loop's thread was on the CPU ``busy`` of the time (0-1; called by
        :meth:`watch`): ``L`` times ``sqrt(target / smoothed lag)``, bounded; ``target_s``
        defaults to :attr:`AdmissionSettings.target_lag_s`.

        ``L`` falls only while the loop is busy computing (``busy`` at least
        :attr:`AdmissionSettings.busy_floor`): a lag from waiting on a blocking call (a
        database round trip or commit made on the loop's thread) is not relieved by
        admitting fewer runs, which would only throw capacity away.

        ``storage_wait_s`` (the window's mean wait for a storage thread, seconds; ``None``:
        no call was taken) gives a second gradient, ``sqrt(target_storage_wait_s /
        smoothed wait)``, and the smaller of the two applies: a storage call waits only
        while every storage thread is busy, which fewer runs in flight do relieve.
        """
        s = self.settings
        target = s.target_lag_s if target_s is None else target_s
        self.lag_s = lag_s
        self.target_lag_s = target
        self.busy = busy
        # A burst (hundreds of requests arriving at once) can stall the loop for a window
        # of its own; clamped, it moves the smoothed lag no more than a sustained overload.
        sample = min(lag_s, 4 * target)
        smoothed = self._smoothed = (
            sample if self._smoothed is None else s.smoothing * sample + (1 - s.smoothing) * self._smoothed
        )
        gradient = math.sqrt(target / max(smoothed, 1e-4))
        gradient = min(1.0 + s.increase, max(1.0 - s.decrease, gradient))
        if gradient < 1.0 and busy < s.busy_floor:
            gradient = 1.0
        self.storage_wait_s = storage_wait_s
        if storage_wait_s is not None:
            wait_target = s.target_storage_wait_s
            wait = min(storage_wait_s, 4 * wait_target)
            waited = self._smoothed_wait = (
                wait
                if self._smoothed_wait is None
                else s.smoothing * wait + (1 - s.smoothing) * self._smoothed_wait
            )
            by_wait = math.sqrt(wait_target / max(waited, 1e-4))
            gradient = min(gradient, min(1.0 + s.increase, max(1.0 - s.decrease, by_wait)))
        # Raised only while in use: an idle process's lag says nothing of what it can carry.
        if gradient < 1.0 or self._waiting or self._peak >= 0.8 * self._cap:
            self._limit = min(float(s.max_limit), max(float(s.min_limit), self._limit * gradient))
        self._cap = int(self._limit)
        self._headroom = self._headroom_for(self._cap)
        self._peak = self.running
        if self._waiting:
            self._grant()
        self._notify_free()  # a raised limit makes room for a worker waiting on a full process

    def snapshot(self) -> dict[str, Any]:
        """The controller's state: limit (runs), running, waiting, lag (ms), tenants
        active, runs refused, completion rate (runs/s)."""
        return {
            "enabled": self.settings.enabled,
            "limit": self._cap,
            "running": self.running,
            "waiting": self._waiting,
            "lag_ms": round(self.lag_s * 1000, 2),
            "smoothed_lag_ms": round((self._smoothed or 0.0) * 1000, 2),
            "target_lag_ms": round(self.target_lag_s * 1000, 2),
            "probe_lag_ms": round(self.probe_lag_s * 1000, 2),
            "busy": round(self.busy, 2),
            "storage_wait_ms": None if self.storage_wait_s is None else round(self.storage_wait_s * 1000, 2),
            "tenants": len(self._tenants),
            "refused": self.refused,
            "completion_rate_per_s": round(self._rate, 1),
        }

    # -- internals ---------------------------------------------------------------------

    def _notify_free(self) -> None:
        """Call the :meth:`notify_when_free` callbacks if there is room for a run now."""
        if self._on_free and self.running < self._cap + self._headroom:
            ready, self._on_free = self._on_free, []
            for notify in ready:
                notify()

    def _headroom_for(self, cap: int) -> int:
        return max(1, math.ceil(cap * self.settings.headroom))

    def _under_share(self, t: _Tenant | None, weight: int) -> bool:
        """Whether a tenant (``None``: not active here) runs fewer than its share of ``L``."""
        if t is None:
            return True  # it runs nothing here, and its share of L is more than nothing
        return t.running * self._weights < self._cap * t.weight

    def _enter(self, tenant_id: str, weight: int) -> _Tenant:
        t = self._tenants.get(tenant_id)
        if t is None:
            t = self._tenants[tenant_id] = _Tenant(weight)
            self._weights += weight
        elif t.weight != weight:  # the plan changed
            self._weights += weight - t.weight
            t.weight = weight
        return t

    def _leave(self, tenant_id: str, t: _Tenant) -> None:
        del self._tenants[tenant_id]
        self._weights -= t.weight

    def _count(self, tenant_id: str, weight: int) -> None:
        t = self._tenants.get(tenant_id)
        if t is None or t.weight != weight:
            t = self._enter(tenant_id, weight)
        t.running += 1
        self.running += 1
        if self.running > self._peak:
            self._peak = self.running

    def _drop_waiter(self, tenant_id: str, t: _Tenant, waiter: _Waiter) -> None:
        """Forget a waiter that was not granted (its deadline passed, or its caller left)."""
        if not waiter.future.done():
            waiter.future.cancel()
        try:
            t.waiters.remove(waiter)
            self._waiting -= 1
        except ValueError:
            pass  # already taken off the queue by _grant, which skips a finished waiter
        if not t.running and not t.waiters and self._tenants.get(tenant_id) is t:
            self._leave(tenant_id, t)

    def _grant(self) -> None:
        """Hand free slots to waiting runs: each to the waiting tenant with the fewest runs
        per unit of weight (the one waiting longest among equals)."""
        while self._waiting:
            best: _Tenant | None = None
            best_key = (math.inf, math.inf)
            for t in self._tenants.values():
                if t.waiters:
                    key = (t.running / t.weight, t.waiters[0].since)
                    if key < best_key:
                        best, best_key = t, key
            if best is None:
                return
            room = self.running < self._cap or (
                self.running < self._cap + self._headroom and self._under_share(best, best.weight)
            )
            if not room:
                return
            waiter = best.waiters.popleft()
            self._waiting -= 1
            if waiter.future.done():  # expired or cancelled meanwhile: not admitted
                continue
            best.running += 1
            self.running += 1
            if self.running > self._peak:
                self._peak = self.running
            waiter.future.set_result(None)

    def _eta(self, t: _Tenant, weight: int) -> int:
        """Seconds until a run of a tenant now refused would likely be admitted: its runs
        waiting (and this one) over its share of the process's completion rate; at least
        1, at most 60, rounded up."""
        share = weight / max(self._weights or weight, weight)
        rate = self._rate * share
        ahead = len(t.waiters) + 1
        if rate <= 0:
            return math.ceil(self.settings.max_wait_s) or 1
        return max(1, min(60, math.ceil(ahead / rate)))


class _Slot:
    """:meth:`FairShareAdmission.slot`: a class rather than a generator context manager,
    which costs every run a generator and its frames."""

    __slots__ = ("_admission", "_tenant_id", "_weight")

    def __init__(self, admission: FairShareAdmission, tenant_id: str, weight: int) -> None:
        self._admission = admission
        self._tenant_id = tenant_id
        self._weight = weight

    async def __aenter__(self) -> None:
        if not self._admission.try_admit(self._tenant_id, self._weight):
            await self._admission.admit(self._tenant_id, self._weight)

    async def __aexit__(self, *exc: object) -> None:
        self._admission.release(self._tenant_id)


class _Expired(Exception):
    """A waiter's deadline passed (internal: becomes :class:`~patinox.errors.Overloaded`)."""


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_Expired())
