"""The queue worker: claims queued runs and executes them (in its own process, ``patinox
worker``, or as a task of the API process).

Two kinds of worker are kept apart. The *queue worker* here holds the deployment's
database credentials and KEK: it claims runs, settles them and writes their results. The
*tenant execution process* (the ``process``, ``container`` and ``dedicated`` isolation
levels, not built yet) runs one tenant's agent code and holds no credentials: it reaches
storage only through a channel to the host bound to that tenant. Neither imports the HTTP
API: an import-linter contract in ``pyproject.toml`` keeps FastAPI and :mod:`patinox.api`
out of ``patinox worker``, the runtime, ``control``, ``isolation`` and the layers below.

A :class:`RunWorker` claims runs from the durable fair queue in fair order, executes them
through a :class:`~patinox.control.runs.RunService`, renews their leases while they run,
and puts back in the queue the runs of workers that died (expired leases). How many it
executes at once is, up to its ``concurrency``, its process's
:class:`~patinox.limits.FairShareAdmission` decision (an adaptive limit shared fairly
among tenants, the same one the process's synchronous runs pass). Any number of workers,
in any number of processes, may share one database; ``patinox worker`` runs one as its
own process.
"""

from __future__ import annotations

import asyncio
import math
import time

import structlog

from patinox.control.runs import RunService
from patinox.control.webhooks import WebhookDispatcher
from patinox.errors import PatinoxError
from patinox.limits import DEFAULT_LEASE_S, Claim, FairRunQueue, FairShareAdmission, QueueListener

log = structlog.get_logger("patinox.worker")


class RunWorker:
    """A queue worker: claims and executes queued runs.

    Args:
        service: executes a claimed run (admission already happened when it was queued).
        queue: the shared fair queue.
        holder: this worker's name in claims (unique per process).
        concurrency: most runs executed at once by this worker.
        admission: its process's fair share of capacity: within ``concurrency``, the
            worker claims a run only of a tenant it may admit now
            (:meth:`FairShareAdmission.claimable`), and counts the runs it executes there.
        poll_s: wait between claim attempts when the queue is empty, seconds (on
            PostgreSQL a run queued by any process ends the wait at once).
        lease_s: lease of a claim, seconds; renewed every third of it.
        reap_s: least time between two requeues of expired runs, seconds (default a
            third of ``lease_s``: a dead worker's run is back in the queue at most
            ``lease_s + reap_s + poll_s`` after its last renewal).
        webhooks: a webhook delivery loop run beside the worker, started and stopped with
            it (``None``: none).
    """

    def __init__(
        self,
        service: RunService,
        queue: FairRunQueue,
        *,
        holder: str,
        concurrency: int = 8,
        poll_s: float = 0.2,
        lease_s: float = DEFAULT_LEASE_S,
        reap_s: float | None = None,
        admission: FairShareAdmission | None = None,
        webhooks: WebhookDispatcher | None = None,
    ) -> None:
        self._service = service
        self.webhooks = webhooks
        self._queue = queue
        self.holder = holder
        self._admission = admission
        self._slots = asyncio.Semaphore(concurrency)
        self._free_pending = False  # waiting for the admission to have room
        self._poll_s = poll_s
        self._lease_s = lease_s
        self._reap_s = lease_s / 3 if reap_s is None else reap_s
        self._reaped_at = -math.inf
        self._claims: dict[tuple[str, str], Claim] = {}
        self.wakeup = asyncio.Event()
        self._freed = asyncio.Event()  # the admission has room again (see _idle)
        self.completed = 0
        #: The PostgreSQL LISTEN thread while :meth:`run` runs (None on SQLite).
        self.listener: QueueListener | None = None
        self._running = False

    @property
    def running(self) -> bool:
        """True while :meth:`run` is claiming runs (from its start until it stops or fails)."""
        return self._running

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Work until ``stop`` is set (or the task is cancelled); in-flight runs are then
        cancelled and recorded as failed, their queue entries released."""
        stop = stop or asyncio.Event()
        renewer = asyncio.create_task(self._renew_forever())
        running: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        # PostgreSQL: a run queued by any process wakes this worker at once.
        self.listener = self._queue.listen(lambda: loop.call_soon_threadsafe(self.wakeup.set))
        # Setting ``stop`` ends an idle wait too, not only at the next poll.
        stopper = asyncio.create_task(self._wake_on(stop))
        webhooks_stop = asyncio.Event()
        deliveries = None if self.webhooks is None else asyncio.create_task(self.webhooks.run(webhooks_stop))
        self._running = True
        try:
            self._reap()
            while not stop.is_set():
                await self._slots.acquire()
                skip = frozenset() if self._admission is None else self._admission.claimable()
                claim = None
                try:
                    if skip is not None:
                        claim = self._queue.claim(self.holder, lease_s=self._lease_s, skip=skip)
                except PatinoxError as err:
                    # A storage failure (a lost connection, a deadlock victim) must not end
                    # the worker: the queue is durable, so try again after a pause.
                    log.warning("claim failed; retrying", error=err.code, detail=err.message)
                if claim is None:
                    self._slots.release()
                    self.wakeup.clear()
                    if stop.is_set():
                        continue
                    await self._idle(skip)
                    if time.monotonic() - self._reaped_at >= self._reap_s:
                        self._reap()
                    continue
                if self._admission is not None:
                    self._admission.take(claim.tenant_id, claim.weight)
                task = asyncio.create_task(self._execute(claim))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            self._running = False
            if self.listener is not None:
                await asyncio.to_thread(self.listener.close)
            renewer.cancel()
            stopper.cancel()
            for t in list(running):
                t.cancel()
            if deliveries is not None and self.webhooks is not None:
                # The delivery loop ends after the batch it is sending (each attempt has its
                # time limit), so a stop records what was sent instead of sending it again.
                webhooks_stop.set()
                done, _ = await asyncio.wait({deliveries}, timeout=self.webhooks.settings.timeout_s + 5.0)
                if not done:
                    deliveries.cancel()
                running.add(deliveries)
            await asyncio.gather(renewer, stopper, *running, return_exceptions=True)

    async def _idle(self, skip: frozenset[str] | None) -> None:
        """After a claim found nothing (``skip``: the tenants it passed over; ``None``: the
        process was full and nothing was asked), wait for a reason to ask the queue again:
        a run queued (:attr:`wakeup`, also set on stop), room for a tenant it passed over
        or for any run, or the poll interval. A run ending here that only frees a slot for
        the same tenants again asks nothing of the database: at saturation runs end
        hundreds of times a second, and a claim each time cost the process a sixth of its
        throughput."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._poll_s
        admission = self._admission
        while True:
            self._freed.clear()
            if admission is not None and (skip is None or skip):
                self._wake_when_free(admission)
            waits = {asyncio.ensure_future(self.wakeup.wait()), asyncio.ensure_future(self._freed.wait())}
            try:
                await asyncio.wait(
                    waits, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for w in waits:
                    w.cancel()
            if self.wakeup.is_set() or not self._freed.is_set() or admission is None:
                return  # a run was queued (or stop), or the poll interval passed
            now = admission.claimable()
            if now is not None and skip is not None and now >= skip:
                continue  # every tenant the claim passed over still is: nothing new to ask
            return

    def _wake_when_free(self, admission: FairShareAdmission) -> None:
        if not self._free_pending:
            self._free_pending = True
            admission.notify_when_free(self._on_free)

    def _on_free(self) -> None:
        self._free_pending = False
        self._freed.set()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.wakeup.set()

    async def _execute(self, claim: Claim) -> None:
        key = (claim.tenant_id, claim.run_id)
        self._claims[key] = claim
        try:
            await self._service.execute_claim(claim)
            self.completed += 1
        except Exception as err:  # recorded on the run; the worker goes on
            log.warning(
                "run failed", tenant_id=claim.tenant_id, run_id=claim.run_id, error=type(err).__name__
            )
        finally:
            self._claims.pop(key, None)
            if self._admission is not None:
                self._admission.release(claim.tenant_id)
            self._slots.release()

    def _reap(self) -> None:
        self._reaped_at = time.monotonic()
        try:
            self._service.reap_expired()
        except PatinoxError as err:
            log.warning("requeueing expired runs failed; retrying later", error=err.code, detail=err.message)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                self._queue.renew(list(self._claims.values()), lease_s=self._lease_s)
            except PatinoxError as err:
                # The next renewal, a third of a lease later, still comes before expiry.
                log.warning("lease renewal failed; retrying", error=err.code, detail=err.message)
