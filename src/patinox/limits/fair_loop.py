"""A tenant-fair event loop: the loop's ready callbacks are taken in weighted round robin by
tenant instead of first come, first served.

Why: admission (:mod:`patinox.limits.admission`) bounds how many runs a process carries,
but the runs it admitted still share one event loop, whose ready queue is a single FIFO.
Near saturation every callback waits behind every other one: a light tenant with one run
in flight waits, at each of its run's steps, behind the hundreds of callbacks of a
neighbour with hundreds of runs in flight, and its latency grows with the neighbour's load
(the noisy neighbour inside the process). Taking ready callbacks by tenant in turn bounds
that wait to one turn per active tenant, whatever each one has in flight.

How: :class:`FairReadyQueue` replaces the loop's ready deque. A callback belongs to the
tenant active in the :class:`contextvars.Context` it will run in (a task's steps, its
timers and the I/O callbacks it registered all carry the task's context, so they follow
its tenant); callbacks with no tenant (the server's own I/O, accepting and parsing
requests, background work) form the *system* flow. Each pass takes from the system flow
and the tenant flows alternately (when both have callbacks ready), and among tenants in
weighted round robin: a tenant's turn takes up to its plan weight of callbacks (``free``
1, ``pro`` 4, ``enterprise`` 16), then the next tenant's turn comes. A tenant absent from
the round goes first (a *sparse* flow, after FQ-CoDel, RFC 8290): a light tenant's run,
back from waiting on its model, barely waits; a flow that empties keeps its place until
its next turn, so a tenant whose callbacks come one at a time is not new again (and first)
at each, and the turns of the others keep what was left of them. Callbacks of one flow
keep their order, so a task's steps and a transport's reads stay in sequence; only
callbacks of different tenants, which share nothing, are reordered. The admission's lag
probe runs in a flow of its own (:func:`flow_scope`), so the lag it measures is the wait
of a tenant that has just become active.

Where it applies: the loop of ``patinox serve`` and ``patinox worker`` while the fair share
is on (``PATINOX_FAIR_SHARE=off`` gives the stock loop). It works with CPython's own
asyncio loop (3.11-3.13), whose pure-Python scheduler keeps the ready queue in the
attribute ``_ready`` and calls only ``append``, ``popleft``, ``clear``, ``len()`` and
truth on it; :func:`install` checks that the loop has one and otherwise leaves it alone and
says so (uvloop, for one, keeps its queue in C).

Sources: weighted round robin and deficit round robin (Shreedhar and Varghese, "Efficient
Fair Queueing using Deficit Round Robin", SIGCOMM 1995), here with a quantum counted in
callbacks; the sparse-flow rule of FQ-CoDel (RFC 8290, section 4.1); CPython
``asyncio/base_events.py`` (``BaseEventLoop._run_once``).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from patinox.tenancy import get_plan, tenant_in

__all__ = ["FairReadyQueue", "describe", "flow_scope", "install", "new_event_loop", "ready_queue"]

#: Most callbacks one pass of the loop runs before it polls timers and sockets again. A
#: trade: a light tenant's timer or reply waits out at most this many callbacks before it
#: joins the turns (about 6 ms at 50 us a callback), and each pass costs a poll; at 32 a
#: saturated server completed about 8 % fewer runs than with no cap.
BATCH = 128

#: The name of a flow that is neither a tenant nor the system (the admission's lag probe).
_flow: contextvars.ContextVar[str | None] = contextvars.ContextVar("patinox_flow", default=None)


@contextmanager
def flow_scope(name: str) -> Iterator[None]:
    """``with flow_scope("probe"):`` makes the callbacks scheduled from the body a flow of
    their own, with weight 1, named ``name`` (prefixed so it can never be a tenant id)."""
    token = _flow.set(f"flow:{name}")
    try:
        yield
    finally:
        _flow.reset(token)


class FairReadyQueue:
    """Ready callbacks by flow, served in turn: the drop-in for an asyncio loop's ready deque.

    The interface is what ``BaseEventLoop`` uses: ``append`` (a :class:`asyncio.Handle`),
    :meth:`popleft`, :meth:`clear`, ``len()`` and truth. ``popleft`` raises
    :class:`IndexError` when empty, as a deque does. ``len()`` is what the loop runs in one
    pass, at most :data:`BATCH`; :attr:`size` is everything queued.

    ``append`` may be called from any thread (``call_soon_threadsafe``: executor and
    ``to_thread`` completions, listener threads): it is a plain deque's ``append``, atomic
    under the GIL, into an inbox that only the loop's own thread files into flows (in
    ``len()``, truth aside, and :meth:`popleft`).
    """

    __slots__ = (
        "_credit",
        "_flows",
        "_inbox",
        "_n",
        "_system",
        "_system_next",
        "_turns",
        "_weight",
        "append",
        "popped",
    )

    def __init__(self) -> None:
        #: Handles appended and not yet filed into a flow, in order (any thread appends).
        self._inbox: collections.deque[asyncio.Handle] = collections.deque()
        self.append = self._inbox.append
        self._system: collections.deque[asyncio.Handle] = collections.deque()
        #: Flow key (tenant id, or ``flow:<name>``) -> its ready callbacks. A flow that
        #: empties keeps its place in the turns until its next turn comes (an empty
        #: placeholder): a flow is new, and goes first, only after a whole round away.
        self._flows: dict[str, collections.deque[asyncio.Handle]] = {}
        #: The keys of the flows, the one whose turn it is first.
        self._turns: collections.deque[str] = collections.deque()
        #: Each flow's callbacks per turn (its plan weight) and what is left of its turn.
        self._weight: dict[str, int] = {}
        self._credit: dict[str, int] = {}
        self._system_next = True
        self._n = 0  # callbacks filed, system and tenant flows
        #: Callbacks taken from the queue, ever (for the mean cost of one callback).
        self.popped = 0

    def __len__(self) -> int:
        # The loop runs len() callbacks a pass, then polls its timers and sockets: capped,
        # a timer or a reply that falls due waits out at most BATCH callbacks, not the
        # whole backlog, before it joins its tenant's turn.
        if self._inbox:
            self._file_inbox()
        return self._n if self._n < BATCH else BATCH

    @property
    def size(self) -> int:
        """Callbacks queued, all flows (``len()`` is at most :data:`BATCH` of them)."""
        return self._n + len(self._inbox)

    def __bool__(self) -> bool:
        return self._n > 0 or bool(self._inbox)

    def _file_inbox(self) -> None:
        """File the inbox's handles into their flows, in order (the loop's thread only)."""
        inbox = self._inbox
        while inbox:
            self._file(inbox.popleft())

    def _file(self, handle: asyncio.Handle) -> None:
        """Queue ``handle`` at the end of its flow."""
        # The handle's context says whose callback it is; asyncio keeps it only in this
        # private attribute, and replacing the ready queue is what this module does.
        context: contextvars.Context = handle._context  # type: ignore[attr-defined]  # noqa: SLF001
        tenant = tenant_in(context)
        if tenant is not None:
            key = tenant.tenant_id
        else:
            named = context.get(_flow)
            if named is None:
                self._system.append(handle)
                self._n += 1
                return
            key = named
        queue = self._flows.get(key)
        if queue is None:
            # A flow absent for a whole round goes first (a sparse flow, as in FQ-CoDel):
            # a light tenant's one ready callback runs next instead of after a turn of
            # every busy tenant. Its own turn over, it goes last like any other.
            weight = get_plan(tenant.plan).weight if tenant is not None else 1
            self._flows[key] = queue = collections.deque()
            self._turns.appendleft(key)
            self._weight[key] = self._credit[key] = weight
        queue.append(handle)
        self._n += 1

    def popleft(self) -> asyncio.Handle:
        """The next callback: the system flow's and the tenants' alternately, the tenants'
        in weighted round robin."""
        if self._inbox:
            self._file_inbox()
        system = self._system
        if system and (self._system_next or self._n == len(system)):
            self._system_next = False
            self._n -= 1
            self.popped += 1
            return system.popleft()
        if not self._n:
            raise IndexError("pop from an empty FairReadyQueue")
        self._system_next = True
        turns, flows, credit = self._turns, self._flows, self._credit
        while True:  # ends: some tenant flow holds a callback
            key = turns[0]
            queue = flows[key]
            if queue:
                break
            # An emptied flow's turn came round and it is still empty: it leaves.
            turns.popleft()
            del flows[key], credit[key], self._weight[key]
        handle = queue.popleft()
        self._n -= 1
        self.popped += 1
        left = credit[key] - 1
        if left <= 0 or not queue:
            credit[key] = self._weight[key]
            turns.rotate(-1)  # its turn is over (or it emptied): to the back of the round
        else:
            credit[key] = left
        return handle

    def clear(self) -> None:
        """Drop every queued callback (the loop does when it closes)."""
        self._inbox.clear()
        self._system.clear()
        self._flows.clear()
        self._turns.clear()
        self._weight.clear()
        self._credit.clear()
        self._n = 0

    def flows(self) -> dict[str, int]:
        """Ready callbacks per flow now (``"system"`` and each flow in the round, an
        emptied one with 0); on the loop's thread, like :meth:`popleft`."""
        self._file_inbox()
        return {"system": len(self._system), **{k: len(q) for k, q in self._flows.items()}}


def install(loop: asyncio.AbstractEventLoop) -> bool:
    """Give ``loop`` a :class:`FairReadyQueue`; before it runs anything. Returns whether it
    did: ``False`` for a loop without CPython's ready deque (uvloop) or one with callbacks
    already queued, which is left as it was."""
    ready = getattr(loop, "_ready", None)
    if isinstance(ready, FairReadyQueue):
        return True
    if type(ready) is not collections.deque or ready:
        return False
    # Replacing asyncio's ready queue (a private attribute of its base event loop) is the
    # point of this module; ``_ready`` is checked above to be CPython's plain deque.
    loop._ready = FairReadyQueue()  # type: ignore[attr-defined]  # noqa: SLF001
    return True


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new asyncio event loop with a :class:`FairReadyQueue`: a loop factory for
    ``asyncio.Runner(loop_factory=...)`` and for uvicorn (``loop=
    "patinox.limits.fair_loop:new_event_loop"``)."""
    loop = asyncio.new_event_loop()
    install(loop)
    return loop


def ready_queue(loop: Any) -> FairReadyQueue | None:
    """The :class:`FairReadyQueue` of ``loop``, or ``None`` when its loop is first come,
    first served."""
    ready = getattr(loop, "_ready", None)
    return ready if isinstance(ready, FairReadyQueue) else None


def describe(loop: Any) -> str:
    """``"tenant-fair"`` when ``loop`` takes ready callbacks by tenant, else ``"fifo"``."""
    return "tenant-fair" if ready_queue(loop) is not None else "fifo"
