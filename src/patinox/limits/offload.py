"""Storage calls off the event loop, shared fairly among tenants.

Why: a process's storage calls (authentication, admission, settlement, a run's rows) are
synchronous SQLAlchemy calls. On SQLite one takes microseconds, and it is cheapest to make
it where it is asked for. On PostgreSQL each is one or more network round trips, during
which the event loop's thread waits and nothing else in the process moves: near
saturation the heavy tenants' round trips follow each other on that thread, and a light
tenant's request waits behind all of them in first-come-first-served order.

How: :class:`FairStorageExecutor` runs the calls in a small pool of storage threads
(:attr:`~patinox.runtime.Settings.storage_threads`, default 3), the event loop awaiting
each one's result. Calls waiting for a thread are taken in start-time fair queueing (SFQ)
order by tenant: a call of tenant ``f`` arriving at virtual time ``v`` gets the start tag
``S = max(v, F_f)``, where ``F_f`` is the finish tag (``S + 1``) of ``f``'s previous
waiting call, and ``v`` is the start tag of the call most recently given a thread; the
call with the smallest start tag goes next. A tenant with fifty calls waiting therefore
delays another tenant's one call by at most about one call of each tenant with calls
waiting (and the calls already running), not by fifty. Among equal start tags, the call of
a *sparse* flow (one with nothing else waiting: a light tenant's run makes its calls one
after the other) goes first, then the earliest asked (the sparse-flow rule of FQ-CoDel,
RFC 8290, section 4.1): a tenant that never has two calls waiting waits only for a thread
to come free, however many busy tenants share the threads; a busy tenant's calls, which
always have company, never take that place.
Calls made before a tenant is known (authentication) form the *system* flow, with a share
of its own.

:class:`InlineStorage` has the same interface and makes each call at once, on the loop's
thread: the choice for SQLite (:func:`storage_calls`).

Both are :class:`StorageCalls`: the run path (:class:`~patinox.control.runs.RunService`)
and the HTTP authentication step make their storage calls through one of them.

Sources: P. Goyal, H. M. Vin and H. Cheng, "Start-time fair queueing: a scheduling
algorithm for integrated services packet switching networks", IEEE/ACM ToN 5(5), 1997;
T. Hoeiland-Joergensen et al., "The Flow Queue CoDel Packet Scheduler and Active Queue
Management Algorithm", RFC 8290, 2018.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeVar

from patinox.errors import ConfigurationError

__all__ = [
    "SYSTEM_FLOW",
    "FairStorageExecutor",
    "InlineStorage",
    "StorageCalls",
    "storage_calls",
]

P = ParamSpec("P")
T = TypeVar("T")

#: The flow of calls made before a tenant is known (authentication); never a tenant id.
SYSTEM_FLOW = "flow:system"

#: The interpreter's thread switch interval while storage threads run, seconds (see
#: :class:`FairStorageExecutor`; :func:`sys.setswitchinterval`).
SWITCH_INTERVAL_S = 0.0005

#: Most storage threads a process may run (each holds a database connection while busy).
MAX_THREADS = 64


class StorageCalls(Protocol):
    """Where a process makes its storage calls: inline or in storage threads.

    ``call`` and ``finish`` return ``fn(*args, **kwargs)`` and raise what it raised; they
    differ only when the awaiting task is cancelled (see :class:`FairStorageExecutor`).
    """

    async def call(self, tenant_id: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def finish(self, tenant_id: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def system(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...

    def wait_window(self) -> float | None: ...

    def close(self) -> None: ...


class InlineStorage:
    """Every storage call made at once on the caller's thread (the event loop's): no thread
    hop, no queue. Nothing awaits inside, so a call is never interrupted by a cancellation."""

    async def call(self, tenant_id: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)``, now."""
        return fn(*args, **kwargs)

    async def finish(self, tenant_id: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)``, now."""
        return fn(*args, **kwargs)

    async def system(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)``, now."""
        return fn(*args, **kwargs)

    def wait_window(self) -> float | None:
        """``None``: no call ever waits here."""
        return None

    def close(self) -> None:
        """Nothing to stop."""


@dataclass(eq=False, slots=True)
class _Call:
    flow: str
    fn: Callable[[], Any]
    context: contextvars.Context
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    #: When it was asked for (``time.monotonic()``), for the queue's wait.
    asked: float = 0.0
    #: The awaiting task gave up before a thread took the call: it never runs.
    withdrawn: bool = False
    #: A thread took it (set under the executor's lock).
    started: bool = False


@dataclass(eq=False, slots=True)
class _Flow:
    finish_tag: float = 0.0
    waiting: int = 0


@dataclass(eq=False)
class _State:
    heap: list[tuple[float, int, int, _Call]] = field(default_factory=list)
    flows: dict[str, _Flow] = field(default_factory=dict)
    virtual: float = 0.0  # start tag of the call most recently given a thread
    seq: int = 0  # arrival order, the tie-break among equal start tags
    running: int = 0
    completed: int = 0
    closed: bool = False
    waited_s: float = 0.0  # seconds calls taken since the last wait_window() waited, summed
    taken: int = 0  # calls taken since the last wait_window()


class FairStorageExecutor:
    """Storage calls in ``threads`` storage threads, waiting calls served in start-time fair
    queueing order by tenant; see the module docstring.

    ``await executor.call(tenant_id, fn, *args)`` runs ``fn(*args)`` in a storage thread,
    inside a copy of the caller's :mod:`contextvars` context (its tenant scope included),
    and returns its result or raises its exception. If the awaiting task is cancelled:

    - while the call waits for a thread, the call is withdrawn and never runs;
    - while it runs, :meth:`call` raises :class:`asyncio.CancelledError` at once and the
      call runs to its end in its thread; its result (or exception) is dropped.

    :meth:`finish` is for a call that must not be abandoned half way (an admission or a
    settlement): once asked, it runs to its end, and a cancellation that arrives meanwhile
    is raised only after it ended. :meth:`system` is :meth:`call` in the system flow.

    Threads start with the executor and are daemons; :meth:`close` stops them after the
    calls already asked for.

    Args:
        threads: storage threads, 1 to :data:`MAX_THREADS`.
        name: prefix of the threads' names.

    Raises:
        ConfigurationError: ``threads`` out of range.
    """

    def __init__(self, threads: int = 3, *, name: str = "patinox-storage") -> None:
        if not 1 <= threads <= MAX_THREADS:
            raise ConfigurationError(f"storage threads must be 1 to {MAX_THREADS}, not {threads}")
        self.threads = threads
        # A storage thread whose round trip returned waits for the interpreter lock until
        # the loop's thread yields it, up to the switch interval (5 ms by default) at each
        # of a call's round trips while the loop computes: shorter, so a call is not
        # stretched by the loop's work (the loop yields only when a thread asks).
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._state = _State()
        self._cond = threading.Condition(threading.Lock())
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._workers:
            t.start()

    # -- asking ---------------------------------------------------------------------

    def _submit(self, flow: str, fn: Callable[[], Any]) -> _Call:
        loop = asyncio.get_running_loop()
        item = _Call(flow, fn, contextvars.copy_context(), loop, loop.create_future(), time.monotonic())
        with self._cond:
            st = self._state
            if st.closed:
                raise RuntimeError("the storage executor is closed")
            f = st.flows.get(flow)
            sparse = f is None  # nothing of this flow waits: it goes first among equals
            if f is None:
                f = st.flows[flow] = _Flow(st.virtual)
            start = max(st.virtual, f.finish_tag)
            f.finish_tag = start + 1.0
            f.waiting += 1
            st.seq += 1
            heapq.heappush(st.heap, (start, 0 if sparse else 1, st.seq, item))
            self._cond.notify()
        return item

    async def call(self, tenant_id: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in a storage thread, in ``tenant_id``'s turn.

        Returns:
            What ``fn`` returned.

        Raises:
            Whatever ``fn`` raised; :class:`asyncio.CancelledError` as the class says.
        """
        item = self._submit(tenant_id, _bound(fn, args, kwargs))
        try:
            result: T = await item.future
        except asyncio.CancelledError:
            self._withdraw(item)
            raise
        return result

    async def system(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`call` in the system flow (calls made before a tenant is known)."""
        return await self.call(SYSTEM_FLOW, fn, *args, **kwargs)

    async def finish(self, tenant_id: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in a storage thread, in ``tenant_id``'s turn, run to its
        end however often the awaiting task is cancelled meanwhile.

        Returns:
            What ``fn`` returned, when no cancellation arrived while it was awaited.

        Raises:
            Whatever ``fn`` raised.
            asyncio.CancelledError: the awaiting task was cancelled while the call waited
                or ran; raised once the call ended (its result or exception dropped). A
                caller that must know the result whatever happens passes a ``fn`` that
                keeps it (see :class:`~patinox.control.runs.RunService`).
        """
        item = self._submit(tenant_id, _bound(fn, args, kwargs))
        inner = item.future
        cancelled = False
        while not inner.done():
            try:
                await asyncio.shield(inner)
            except asyncio.CancelledError:
                if inner.done() and inner.cancelled():
                    raise  # the loop itself is going away
                cancelled = True
            except BaseException:
                pass
        if cancelled:
            if not inner.cancelled():
                inner.exception()  # retrieved: never "exception was never retrieved"
            raise asyncio.CancelledError
        result: T = inner.result()
        return result

    def _withdraw(self, item: _Call) -> None:
        with self._cond:
            if not item.started:
                item.withdrawn = True

    # -- state --------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Calls asked for and not yet taken by a thread (withdrawn ones included until a
        thread passes them by)."""
        with self._cond:
            return len(self._state.heap)

    @property
    def running(self) -> int:
        """Calls running in a storage thread now."""
        with self._cond:
            return self._state.running

    @property
    def completed(self) -> int:
        """Calls that ran to their end in a storage thread, ever."""
        with self._cond:
            return self._state.completed

    def wait_window(self) -> float | None:
        """The mean time the calls taken by a thread since the last call of this method
        waited for one, seconds (``None``: none was taken); starts the next window. The
        fair-share admission's second signal (:meth:`FairShareAdmission.watch
        <patinox.limits.FairShareAdmission.watch>`): a call waits only while every thread
        is busy, so fewer runs in flight shorten it."""
        with self._cond:
            st = self._state
            waited, taken = st.waited_s, st.taken
            st.waited_s, st.taken = 0.0, 0
        return waited / taken if taken else None

    @property
    def flows(self) -> int:
        """Flows (tenants, the system) with calls waiting."""
        with self._cond:
            return len(self._state.flows)

    # -- the threads --------------------------------------------------------------------

    def _next(self) -> _Call | None:
        """The next call to run (None: closed and drained); under the lock."""
        st = self._state
        while True:
            while st.heap:
                start, _, _, item = heapq.heappop(st.heap)
                f = st.flows[item.flow]
                f.waiting -= 1
                if not f.waiting:
                    del st.flows[item.flow]
                if item.withdrawn:
                    continue
                st.virtual = max(st.virtual, start)
                st.waited_s += time.monotonic() - item.asked
                st.taken += 1
                item.started = True
                st.running += 1
                return item
            if st.closed:
                return None
            self._cond.wait()

    def _work(self) -> None:
        while True:
            with self._cond:
                item = self._next()
            if item is None:
                return
            try:
                value: Any = item.context.run(item.fn)
                error: BaseException | None = None
            except BaseException as exc:
                value, error = None, exc
            finally:
                with self._cond:
                    self._state.running -= 1
                    self._state.completed += 1
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits it
                item.loop.call_soon_threadsafe(_settle, item.future, value, error)
            del item, value, error

    def close(self) -> None:
        """Stop the threads once the calls asked for so far have run (waits for them).
        Idempotent; a call asked for afterwards raises :class:`RuntimeError`."""
        with self._cond:
            self._state.closed = True
            self._cond.notify_all()
        for t in self._workers:
            if t is not threading.current_thread():
                t.join()


def _bound(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], T]:
    if not args and not kwargs:
        return fn
    return lambda: fn(*args, **kwargs)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """On the loop: hand a call's outcome to its future, unless its awaiter gave up."""
    if future.done():
        return  # cancelled: the result is dropped
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def storage_calls(database_url: str, threads: int) -> StorageCalls:
    """Where a deployment's storage calls are made: a :class:`FairStorageExecutor` of
    ``threads`` threads for PostgreSQL (``threads`` 0: inline), :class:`InlineStorage` for
    SQLite (its calls take microseconds: a thread hop costs more than it frees).

    Raises:
        ConfigurationError: ``threads`` above :data:`MAX_THREADS` or negative.
    """
    if not 0 <= threads <= MAX_THREADS:
        raise ConfigurationError(f"storage threads must be 0 to {MAX_THREADS}, not {threads}")
    if threads and database_url.startswith("postgres"):
        return FairStorageExecutor(threads)
    return InlineStorage()
