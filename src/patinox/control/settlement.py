"""Settlement: the end of one run's path, where what it used replaces what admission held.

A run's admission (:mod:`patinox.control.admission`) holds a :class:`Ticket`: a
concurrent-run slot (a row of the shared run queue) and a token reservation in the
shared ledger. Settlement writes the run's records (its result, usage record, audit
record) in the tenant's storage and settles the ticket: the tokens used are spent, the
reservation given back, the slot freed, once.

Where those writes go is decided here, in one place (:meth:`Settlement.joins`), from the
tenant's storage model:

- ``pool`` tenants' rows live in the shared database: the run's row is written in its
  admission's control-plane transaction, and its records in the same transaction as its
  ticket's settlement. Each commits or rolls back whole.
- ``bridge`` and ``silo`` tenants' rows live in a schema or database of their own, which
  no control-plane transaction spans: the writes are made one after the other, in the
  order that loses nothing if the process dies between two of them (see
  :meth:`Settlement.settle`), and an admission whose run row cannot be written is undone.

A pool settlement whose joined transaction fails takes the second way as well.

Queued runs are settled by the worker that executed them; runs whose process died are
settled by :meth:`Settlement.reap_expired`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from pydantic_ai.usage import RunUsage
from sqlalchemy import Connection

from patinox.agents import is_simulated
from patinox.errors import NotFound, PatinoxError
from patinox.limits import RUNS_PER_DAY, Claim, FairRunQueue, TokenBudget
from patinox.storage import (
    AttemptRecord,
    AuditEntry,
    PreparedWrite,
    RunRecord,
    SqlBackend,
    TenantStore,
    UsageRecord,
    utcnow,
)
from patinox.tenancy import TenantContext

log = structlog.get_logger("patinox.runs")

#: Called when a run settles: ``(store, run, values, conn)``, ``conn`` the settlement's
#: control-plane transaction where the tenant's rows share it (``None`` otherwise, after
#: the run's records committed). The webhook outbox (:mod:`patinox.control.webhooks`).
RunEvents = Callable[[TenantStore, RunRecord, RunRecord, Connection | None], None]


class Ticket:
    """What one run's admission holds until its settlement: a slot of the tenant's
    concurrent-run cap and ``reserved_tokens`` of its daily token budget.

    Made by :class:`~patinox.control.admission.RunAdmission`; settled once by
    :meth:`Settlement.release` (through :meth:`Settlement.settle` for a run that ran).

    Attributes:
        tenant_id, run_id: the run.
        period: the ledger period (UTC date) the tokens were reserved in.
        reserved_tokens: tokens reserved for the run's worst case.
        runs_day: the period the run was counted in against ``runs_per_day`` by this
            admission (``None``: a claimed run, counted when it was queued).
        claim: a worker's claim of a queued run (``None``: a synchronous run's hold, or a
            run being queued).
        attempt: the worker's execution of a claimed run (see :class:`Attempt`).
        slot: the run holds a row of the run queue this process frees at settlement.
        joined: the run's records share the control-plane transaction (:meth:`Settlement.joins`).
        called: :meth:`Settlement.release` was called (whether or not it committed).
        released: its release committed; nothing is released again.
        charged: of the run's tokens, those already spent in the ledger before release.
    """

    __slots__ = (
        "attempt",
        "called",
        "charged",
        "claim",
        "joined",
        "period",
        "released",
        "reserved_tokens",
        "run_id",
        "runs_day",
        "slot",
        "tenant_id",
    )

    def __init__(
        self,
        tenant_id: str,
        run_id: str,
        *,
        period: str,
        reserved_tokens: int,
        runs_day: str | None = None,
        claim: Claim | None = None,
        slot: bool = True,
    ) -> None:
        self.tenant_id = tenant_id
        self.run_id = run_id
        self.period = period
        self.reserved_tokens = reserved_tokens
        self.runs_day = runs_day
        self.claim = claim
        self.attempt: Attempt | None = None
        self.slot = slot
        self.joined = False
        self.called = False
        self.released = False
        self.charged = 0


class Attempt:
    """One execution of a queued run by a worker: its number, and its usage kept where it
    outlives the worker.

    After each step of the agent loop (:meth:`record`: after each model response, before
    acting on it) the attempt's usage is written on the run's queue entry
    (:meth:`FairRunQueue.record_usage`) while the entry is still this worker's claim. If
    the worker dies, the reaper puts the run back and charges that usage
    (:meth:`Settlement.reap_expired`): at most the model response in hand when the worker
    died goes uncharged. ``on_entry`` is what the entry holds, unspent, by this worker's
    last write that committed; once the entry is no longer its claim (the lease expired
    while it stalled), that is exactly what the reaper charged, and the worker charges
    only the rest (:meth:`unspent`).

    A failed write ends the run (``RunFailed``, ``internal_error``) rather than let it go
    on unmetered.
    """

    def __init__(
        self, claim: Claim, number: int, *, backend: SqlBackend, queue: FairRunQueue, budget: TokenBudget
    ) -> None:
        self.claim = claim
        #: 1 for the run's first execution, then 2, 3, ... (see TenantStore.start_attempt)
        self.number = number
        self._backend = backend
        self._queue = queue
        self._budget = budget
        self.on_entry = 0
        self.lost = False

    def record(self, usage: RunUsage) -> None:
        """Write ``usage`` (the attempt's so far) on the run's queue entry, if its tokens
        changed and the entry is still this worker's claim.

        Raises:
            StorageError: the database refused the write.
        """
        tokens = usage.input_tokens + usage.output_tokens
        if self.lost or tokens == self.on_entry:
            return
        if self._queue.record_usage(
            self.claim,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            tool_calls=usage.tool_calls,
        ):
            self.on_entry = tokens
        else:
            self.lost = True  # put back: the reaper charged what the entry held

    def unspent(self, used: int, ours: bool) -> int:
        """Of ``used``, the tokens of this attempt not yet spent (by it or by the reaper):
        all of them while the entry is still this worker's claim (``ours``)."""
        return used if ours else max(0, used - self.on_entry)

    def spend(self, used: int) -> None:
        """Spend the attempt's ``used`` tokens in the ledger now (what the reaper already
        charged excepted), and clear them from the entry while it is this worker's claim,
        in one transaction: the reaper can then never charge them again."""
        c = self.claim
        with self._backend.control_tx() as conn:
            ours = self._queue.record_usage(c, input_tokens=0, output_tokens=0, tool_calls=0, conn=conn)
            self._budget.settle_tokens(c.tenant_id, c.quota_period, 0, self.unspent(used, ours), conn=conn)
        self.on_entry = 0
        self.lost = self.lost or not ours

    def ended(self, values: RunRecord) -> AttemptRecord:
        """The attempt's end, from its run's settlement ``values`` (see
        :meth:`TenantStore.prepare_settlement`)."""
        return {
            "attempt": self.number,
            "outcome": outcome_of(values),
            "ended_at": values["finished_at"],
            "input_tokens": values.get("input_tokens", 0),
            "output_tokens": values.get("output_tokens", 0),
            "tool_calls": values.get("tool_calls", 0),
        }


def outcome_of(values: RunRecord) -> str:
    """How an attempt ended (``succeeded``, ``failed``, ``cancelled``), from the settlement
    values of its run."""
    if values["status"] == "succeeded":
        return "succeeded"
    return "cancelled" if (values.get("error") or {}).get("reason") == "cancelled" else "failed"


def usage_record(
    model: str,
    simulated: bool,
    input_tokens: int,
    output_tokens: int,
    tool_calls: int,
    duration_ms: float,
    *,
    cpu_seconds: float | None = None,
    peak_memory_bytes: int | None = None,
) -> UsageRecord:
    """A run's usage record (the ``usage`` row its settlement writes); tokens, milliseconds,
    and the CPU seconds and peak memory bytes of its execution process where measured."""
    record: UsageRecord = {
        "model": model,
        "simulated": int(simulated),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tool_calls": tool_calls,
        "duration_ms": duration_ms,
    }
    if cpu_seconds is not None:
        record["cpu_seconds"] = cpu_seconds
    if peak_memory_bytes is not None:
        record["peak_memory_bytes"] = peak_memory_bytes
    return record


def failed_values(
    duration_ms: float,
    error: dict[str, Any],
    *,
    model: str,
    simulated: bool,
    input_tokens: int = 0,
    output_tokens: int = 0,
    tool_calls: int = 0,
    cpu_seconds: float | None = None,
    peak_memory_bytes: int | None = None,
) -> tuple[RunRecord, UsageRecord | None]:
    """The settlement values of a failed run of ``model`` that ran ``duration_ms``
    milliseconds, with ``error`` (``code``, ``reason``, ``message``), and its usage record:
    ``None`` when it used no tokens (nothing to meter)."""
    values: RunRecord = {
        "status": "failed",
        "finished_at": utcnow(),
        "duration_ms": duration_ms,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tool_calls": tool_calls,
        "error": error,
    }
    if not (input_tokens or output_tokens):
        return values, None
    return values, usage_record(
        model,
        simulated,
        input_tokens,
        output_tokens,
        tool_calls,
        duration_ms,
        cpu_seconds=cpu_seconds,
        peak_memory_bytes=peak_memory_bytes,
    )


_CANCELLED = {
    "code": "run_failed",
    "reason": "cancelled",
    "message": "the run was cancelled: the server stopped, or its tenant was suspended or deleted",
}


def cancelled_values(
    duration_ms: float, model: str, usage: RunUsage | None = None
) -> tuple[RunRecord, UsageRecord | None]:
    """:func:`failed_values` for a run of ``model`` cancelled after ``duration_ms``
    milliseconds, having used ``usage`` (nothing when ``None``)."""
    usage = usage or RunUsage()
    return failed_values(
        duration_ms,
        dict(_CANCELLED),
        model=model,
        simulated=is_simulated(model),
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        tool_calls=usage.tool_calls,
    )


def finish_audit(ctx: TenantContext, run: RunRecord, outcome: str, values: RunRecord) -> AuditEntry:
    """The ``run.finish`` audit record of ``run`` ending with ``values``."""
    return {
        "actor": ctx.principal,
        "action": "run.finish",
        "target": run["id"],
        "outcome": outcome,
        "detail": {
            "agent_id": run["agent_id"],
            "status": values["status"],
            "input_tokens": values.get("input_tokens", 0),
            "output_tokens": values.get("output_tokens", 0),
        },
    }


class Settlement:
    """Writes a run's records beside its admission and settles its ticket; see the module
    docstring. One per :class:`~patinox.control.runs.RunService`.

    Args:
        backend: the deployment's shared database (the control plane).
        budget: the daily token ledger.
        queue: the run queue holding the runs' slots.
    """

    def __init__(self, backend: SqlBackend, budget: TokenBudget, queue: FairRunQueue) -> None:
        self._backend = backend
        self._budget = budget
        self._queue = queue
        #: Told of every settled run (see :data:`RunEvents`); ``None``: nobody is.
        self.events: RunEvents | None = None

    def emit(self, store: TenantStore, run: RunRecord, values: RunRecord, conn: Connection | None) -> None:
        """Tell :attr:`events` that ``run`` settled with ``values``. In ``conn`` (a joined
        settlement) a failure rolls the settlement back with it; after the run's records
        committed (``conn`` ``None``) a failure is logged and the settlement stands."""
        if self.events is None:
            return
        if conn is not None:
            self.events(store, run, values, conn)
            return
        try:
            self.events(store, run, values, None)
        except PatinoxError as err:
            log.warning("recording a settled run's events failed", run_id=run["id"], error=err.code)

    def joins(self, store: TenantStore) -> bool:
        """True when ``store``'s tenant's rows live in the shared database (``pool``), so a
        run's records commit in the same transaction as its admission and settlement."""
        return store.joins(self._backend.engine)

    def open(
        self,
        store: TenantStore,
        insert_run: PreparedWrite,
        admit: Callable[[Connection], Ticket],
        then: Callable[[Ticket, Connection | None], None] | None = None,
    ) -> Ticket:
        """Admit a run (``admit``, in a control-plane transaction) and write its row
        (``insert_run``); then ``then`` (queue it), after the row is written.

        ``pool`` tenants: all three in one transaction. Otherwise the admission commits
        first, then the row is written in the tenant's storage, then ``then`` runs; if
        either of those fails the admission is undone (:meth:`undo`) and a written row
        removed (no worker would ever take it).

        Returns:
            The admission's ticket, with :attr:`Ticket.joined` set.

        Raises:
            PatinoxError: what ``admit`` raised (a refusal; nothing was kept), or the
                storage error that ended the run's writing (its admission undone).
        """
        joined = self.joins(store)
        with self._backend.control_tx() as conn:
            ticket = admit(conn)
            if joined:
                store.apply(insert_run, conn=conn)
                if then is not None:
                    then(ticket, conn)
        ticket.joined = joined
        if not joined:
            written = False
            try:
                store.apply(insert_run)
                written = True
                if then is not None:
                    then(ticket, None)
            except BaseException:
                self.undo(ticket)
                if written:
                    with contextlib.suppress(PatinoxError):
                        store.discard_run(ticket.run_id)
                raise
        return ticket

    def undo(self, ticket: Ticket) -> None:
        """Give back everything an admission took for a run that will not run: its slot,
        its reservation and its count against ``runs_per_day``, in the periods they were
        taken in (not today's: an admission undone after midnight UTC frees a run of the
        day that counted it)."""
        with self._backend.control_tx() as conn:
            if ticket.slot:
                self.release(ticket, 0, conn)
            else:
                self._budget.settle_tokens(
                    ticket.tenant_id, ticket.period, ticket.reserved_tokens, 0, conn=conn
                )
            if ticket.runs_day is not None:
                self._budget.give_back(ticket.tenant_id, RUNS_PER_DAY, 1, ticket.runs_day, conn=conn)

    def release(self, ticket: Ticket, used: int, conn: Connection | None = None) -> None:
        """Settle ``ticket``'s reservation to ``used`` tokens and free its slot, in ``conn``
        when given (the caller commits; see :attr:`Ticket.released`).

        A claimed run gives its reservation back only while its entry is still this
        worker's claim: after an expired lease the run was put back with the reservation,
        and whoever claims it next settles it. The tokens this execution used are spent
        either way, less those the reaper charged when it put the run back.
        """
        ticket.called = True
        with self._backend.control_tx(conn) as conn:
            claim = ticket.claim
            if claim is None:
                # By the numbers, not Reservation.settle(): that marks the reservation settled
                # before the transaction commits, and a settlement whose joined transaction
                # rolled back would then be skipped by the fallback (tokens held all day).
                self._budget.settle_tokens(
                    ticket.tenant_id, ticket.period, ticket.reserved_tokens, used, conn=conn
                )
                self._queue.release(ticket.tenant_id, ticket.run_id, conn=conn)
                return
            ours = self._queue.release(claim.tenant_id, claim.run_id, holder=claim.holder, conn=conn)
            attempt = ticket.attempt
            spend = used if attempt is None else attempt.unspent(used, ours)
            self._budget.settle_tokens(
                claim.tenant_id, claim.quota_period, claim.reserved_tokens if ours else 0, spend, conn=conn
            )

    def settle(
        self,
        ticket: Ticket,
        ctx: TenantContext,
        store: TenantStore,
        run: RunRecord,
        values: RunRecord,
        usage: UsageRecord | None,
        *,
        used: int,
        outcome: str,
    ) -> None:
        """Write a finished run's records (its final ``values``, its ``usage`` record when
        it used tokens, a ``run.finish`` audit record with ``outcome``; a queued run's
        attempt ends with it) and settle its ticket to ``used`` tokens; the ticket is
        released whatever happens.

        ``pool`` tenants: in one transaction. Otherwise (bridge and silo tenants, or when
        that transaction fails) the tokens used are first spent in the ledger, then the
        run's records are written in the tenant's storage, then the slot is freed and the
        reservation given back. A process dying between two of these commits leaves either
        a run still running, which is executed again and charged again (both executions
        used tokens), or a finished run whose tokens are already charged, which the next
        worker only releases: never a finished run whose tokens nobody charges. Neither the
        run's result nor the slot and reservation are lost or kept.

        Raises:
            PatinoxError: the run's records could not be written (its ticket is released).
        """
        try:
            attempt = ticket.attempt
            if usage is not None:
                usage = {**usage, "attempt": 1 if attempt is None else attempt.number}
            write = store.prepare_settlement(
                run["id"],
                values,
                usage=usage,
                audit=finish_audit(ctx, run, outcome, values),
                attempt=None if attempt is None else attempt.ended(values),
            )
            if ticket.joined:
                try:
                    with self._backend.control_tx() as conn:
                        store.apply(write, conn=conn)
                        self.emit(store, run, values, conn)
                        self.release(ticket, used, conn)
                except PatinoxError:
                    pass  # rolled back, the run's own records too: write them as below
                else:
                    ticket.released = True  # committed
                    return
            if used:
                with contextlib.suppress(PatinoxError):  # not charged here: release charges them
                    if attempt is None:
                        self._budget.settle_tokens(ticket.tenant_id, ticket.period, 0, used)
                    else:
                        attempt.spend(used)
                    ticket.charged = used
            store.apply(write)
            self.emit(store, run, values, None)
        finally:
            if not ticket.released:
                ticket.released = True
                self.release(ticket, used - ticket.charged)

    def settle_unstarted(
        self, ticket: Ticket, store: TenantStore, ctx: TenantContext, run: RunRecord
    ) -> None:
        """Settle a run whose task was cancelled before its first step (a tenant stopped,
        or the server shutting down, in the loop iteration after the run was admitted): it
        never reached :meth:`settle`, so record it failed as cancelled and give back its
        slot and reservation: it used nothing. Does nothing for a run that did.

        Without this the slot and the worst-case tokens stay held until the hold's lease
        expires, and the reaper then charges the whole reservation. A failure here leaves
        exactly that to happen.
        """
        if ticket.called:
            return
        values, _ = cancelled_values(0.0, run["model"])
        attempt = ticket.attempt
        write = store.prepare_settlement(
            run["id"],
            values,
            usage=None,
            audit=finish_audit(ctx, run, "error", values),
            attempt=None if attempt is None else attempt.ended(values),
        )
        try:
            if ticket.joined:
                with self._backend.control_tx() as conn:
                    store.apply(write, conn=conn)
                    self.emit(store, run, values, conn)
                    self.release(ticket, 0, conn)
                return
            with contextlib.suppress(PatinoxError):  # the run row only; its tokens are free
                store.apply(write)
                self.emit(store, run, values, None)
            self.release(ticket, 0)
        except PatinoxError:
            pass  # the hold's lease expires and the reaper settles the run

    def reap_expired(self, now: datetime | None = None) -> int:
        """Requeue runs of dead workers; settle the synchronous runs whose API process died
        (their hold expired at ``now``, UTC, default the present). Returns how many runs
        were affected.

        A run put back keeps its reservation (its next attempt settles it); the tokens its
        dead worker's attempt had recorded (:class:`Attempt`) are spent in the ledger in
        the same transaction as the requeue, in the period of the claim. Then, in the
        tenant's storage, the attempt ends ``interrupted`` with that usage and a usage
        record, a ``run.requeue`` audit record names the dead holder and the attempt, and
        a warning is logged (see :meth:`_record_requeue`).

        A dead process's synchronous run still running is recorded as failed and charged
        its whole reservation (what it used is unknown: the budget errs on the side of
        refusing). A run it had recorded finished (a bridge or silo tenant's run, recorded
        in the tenant's database before the shared one heard of it) keeps its result, and
        its reservation is given back: its tokens were charged before it was recorded.
        """
        requeued: list[Claim] = []

        def charge(conn: Connection, claims: list[Claim]) -> None:
            requeued[:] = claims  # read only once the requeue committed
            for c in sorted(claims, key=lambda c: (c.tenant_id, c.quota_period)):  # lock order
                used = c.input_tokens + c.output_tokens
                if used and c.quota_period:
                    self._budget.settle_tokens(c.tenant_id, c.quota_period, 0, used, conn=conn)

        back, holds = self._queue.requeue_expired(now, on_requeue=charge)
        for claim in requeued:
            self._record_requeue(claim)
        for hold in holds:
            try:
                store = self._backend.acting_on(hold.tenant_id)
                finished = store.get_run(hold.run_id)["status"] in ("succeeded", "failed")
            except NotFound:
                store, finished = None, False
            if store is not None and not finished:
                values: RunRecord = {
                    "status": "failed",
                    "finished_at": utcnow(),
                    "error": {
                        "code": "run_failed",
                        "reason": "interrupted",
                        "message": "the server process running this synchronous run stopped",
                    },
                }
                with contextlib.suppress(NotFound):
                    store.update_run(hold.run_id, values)
                    self.emit(store, {"id": hold.run_id}, values, None)
            if hold.quota_period:  # holds written before reservations were kept on them have none
                reserved = hold.reserved_tokens
                self._budget.settle_tokens(
                    hold.tenant_id, hold.quota_period, reserved, 0 if finished else reserved
                )
        return back + len(holds)

    def _record_requeue(self, claim: Claim) -> None:
        """Record in the tenant's storage that ``claim``'s run went back to the queue after
        its holder's lease expired (its attempt interrupted, with a usage record of what it
        had recorded, and a ``run.requeue`` audit record), and log a warning. The tokens
        were already charged with the requeue: a failure here loses the record of it, not
        the charge (logged; the run's next attempt closes the attempt as interrupted)."""
        detail = {
            "holder": claim.holder,
            "reason": "lease_expired",
            "input_tokens": claim.input_tokens,
            "output_tokens": claim.output_tokens,
        }
        number: int | None = None
        try:
            store = self._backend.acting_on(claim.tenant_id)
            number = store.interrupt_attempt(
                claim.run_id,
                holder=claim.holder,
                input_tokens=claim.input_tokens,
                output_tokens=claim.output_tokens,
                tool_calls=claim.tool_calls,
                audit={
                    "actor": "system",
                    "action": "run.requeue",
                    "target": claim.run_id,
                    "outcome": "ok",
                    "detail": detail,
                },
            )
        except NotFound:
            pass  # the tenant is gone: nothing of it to record
        except PatinoxError as err:
            log.warning(
                "recording a requeued run failed",
                tenant_id=claim.tenant_id,
                run_id=claim.run_id,
                holder=claim.holder,
                error=err.code,
            )
        log.warning(
            "run requeued: its worker's lease expired",
            tenant_id=claim.tenant_id,
            run_id=claim.run_id,
            holder=claim.holder,
            attempt=number,
            input_tokens=claim.input_tokens,
            output_tokens=claim.output_tokens,
        )
