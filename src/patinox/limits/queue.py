"""The durable run queue with weighted fair scheduling across tenants.

Asynchronous runs wait in the ``run_queue`` table of the deployment's shared database, so
a restart of any process loses none. Workers (any number of processes) take the next run
with :meth:`FairRunQueue.claim`; a claim is a lease that the worker renews while it runs
the run, and a lease that expires (the worker died) puts the run back in the queue.

Scheduling is self-clocked fair queueing (SCFQ; S. J. Golestani, "A self-clocked fair
queueing scheme for broadband applications", INFOCOM 1994), a form of weighted fair
queueing: each tenant ``i`` has a weight ``w_i`` (from its plan) and every run costs 1.
When a run is enqueued it gets the virtual finish tag::

    F = max(F_last(i), V) + 1 / w_i

where ``F_last(i)`` is the tag of the tenant's previous run and ``V``, the queue's virtual
time, is the tag of the run dispatched last. Runs are dispatched in order of
``(priority desc, F)``: a tenant with 1,000 queued runs has tags spread ``1/w`` apart
ahead of it, while a tenant that enqueues one run gets a tag at most ``1/w`` past ``V``,
so it waits behind at most a few runs, not a thousand. Over a backlog, tenants receive
dispatches in proportion to their weights. ``priority`` is a strict tier above that (SLA
plans).

Concurrency caps: a claim never takes a run of a tenant that already has
``max_running`` runs held (claimed by a worker, or admitted as synchronous runs through
:meth:`FairRunQueue.hold`); the check and the claim happen under a lock on the tenant's
``queue_tenants`` row (PostgreSQL ``FOR UPDATE``; on SQLite each queue transaction starts
with a write, taking the database's write lock), so several processes never exceed a cap.
Synchronous runs are held as already-claimed rows with ``finish_tag`` 0. Candidates are
read with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL so concurrent workers do not wait on
each other's picks, and a claim skips a tenant whose queue row another transaction holds
(``SKIP LOCKED`` again) rather than wait: two workers locking candidate tenants in
opposite orders would otherwise deadlock.

Wake-ups: an idle worker looks at the queue every ``poll_s`` seconds. A run queued in the
same process wakes it at once (:meth:`~patinox.control.runs.RunService.set_wakeup`). On
PostgreSQL a run queued (or put back) by any process also wakes idle workers everywhere:
the queueing transaction sends ``NOTIFY`` on :data:`NOTIFY_CHANNEL` (delivered at commit,
never for a rolled-back one), and :meth:`FairRunQueue.listen` keeps a ``LISTEN``
connection per worker process (PostgreSQL docs, "NOTIFY"). The notification carries no
payload: no tenant's id or run crosses to a process through it; the woken worker claims
in fair order as ever. SQLite has no such channel across processes; its workers poll.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, Connection, and_, bindparam, delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from patinox.errors import ConcurrencyLimited
from patinox.limits._listener import NOTIFY_CHANNEL, QueueListener
from patinox.storage import SqlBackend, execute_write, utcnow
from patinox.storage import schema as s
from patinox.tenancy import get_plan

#: How long a claim holds a run without renewal, seconds.
DEFAULT_LEASE_S = 30.0
#: Sent when a run is queued or put back (no payload); see :class:`QueueListener`.
_NOTIFY = text(f"NOTIFY {NOTIFY_CHANNEL}")

log = structlog.get_logger("patinox.queue")

# Statements every synchronous run executes, built once (see patinox.storage._statements).
_Q, _QT = s.run_queue, s.queue_tenants
_HELD = select(func.count()).where(_Q.c.tenant_id == bindparam("b_tenant"), _Q.c.claimed_by.is_not(None))
_INSERT_ENTRY = insert(_Q)
#: The columns a hold's row is written with; the others (an attempt's usage) start at
#: their server default.
_HOLD_COLUMNS = [c for c in _Q.c if c.server_default is None]
#: SQLite: a hold's row (every column a parameter), inserted only while the tenant holds
#: fewer than ``b_cap`` runs -- the count (``_HELD``) and the insert as one statement, one
#: write and no separate read. A writing statement takes SQLite's write lock before it
#: reads anything, so no other hold can slip between the count and the insert.
_HOLD_UNDER_CAP = insert(_Q).from_select(
    _HOLD_COLUMNS,
    select(*(bindparam(c.name, type_=c.type) for c in _HOLD_COLUMNS)).where(
        _HELD.scalar_subquery() < bindparam("b_cap")
    ),
)
_RELEASE = delete(_Q).where(_Q.c.tenant_id == bindparam("b_tenant"), _Q.c.run_id == bindparam("b_run"))
#: A worker's release: only while the run is still its claim (not put back after its lease
#: expired, nor claimed again by another worker).
_RELEASE_CLAIM = _RELEASE.where(_Q.c.claimed_by == bindparam("b_holder"))
_LAST_TAG = select(_QT.c.last_tag).where(_QT.c.tenant_id == bindparam("b_tenant"))
_LOCK_TENANT = _LAST_TAG.with_for_update()
#: The same lock for a claim, which skips a tenant whose row another transaction holds:
#: two workers locking candidate tenants in different orders could otherwise deadlock.
_TRY_LOCK_TENANT = _LAST_TAG.with_for_update(skip_locked=True)
#: The tenant's queue row unless it exists, per dialect (parameters: tenant_id, last_tag).
_ENSURE_TENANT = {
    "postgresql": pg_insert(_QT).on_conflict_do_nothing(),
    "sqlite": sqlite_insert(_QT).on_conflict_do_nothing(),
}
_QC = s.queue_clock
#: The single virtual-time row unless it exists, per dialect.
_ENSURE_CLOCK = {
    "postgresql": pg_insert(_QC).values(id=1, virtual_time=0.0).on_conflict_do_nothing(),
    "sqlite": sqlite_insert(_QC).values(id=1, virtual_time=0.0).on_conflict_do_nothing(),
}
#: SQLite: a no-op write to the clock row, which takes the database's write lock.
_TOUCH_CLOCK = update(_QC).where(_QC.c.id == 1).values(virtual_time=_QC.c.virtual_time)
#: Whether any run waits unclaimed (an index probe on ``ix_run_queue_pick``): an idle
#: worker's poll reads this and nothing else.
_ANY_WAITING = select(_Q.c.run_id).where(_Q.c.claimed_by.is_(None)).limit(1)


def _candidates() -> Any:
    """The next unclaimed runs in fair order whose tenant is active and under its cap
    (parameter ``b_scan``: how many)."""
    t = s.tenants
    # Runs held per tenant, counted once over the claimed rows (few: at most the caps).
    # A count correlated to each candidate row instead re-scanned a tenant's whole
    # backlog per queued run: quadratic, so one tenant's thousands of queued runs
    # made every claim of every tenant take seconds.
    held = _Q.alias("held")
    held_now = (
        select(held.c.tenant_id, func.count().label("n"))
        .where(held.c.claimed_by.is_not(None))
        .group_by(held.c.tenant_id)
        .subquery("held_now")
    )
    return (
        select(
            _Q.c.tenant_id,
            _Q.c.run_id,
            _Q.c.finish_tag,
            _Q.c.max_running,
            _Q.c.reserved_tokens,
            _Q.c.quota_period,
            t.c.plan,
        )
        .select_from(
            _Q.join(t, t.c.id == _Q.c.tenant_id).outerjoin(held_now, held_now.c.tenant_id == _Q.c.tenant_id)
        )
        # Tenants at their cap are skipped here (re-checked under the tenant's lock in
        # claim()), so a run of a tenant with room is never stuck behind them.
        .where(_Q.c.claimed_by.is_(None), t.c.state == "active", t.c.moving_to.is_(None))
        .where(func.coalesce(held_now.c.n, 0) < _Q.c.max_running)
        # Tenants this process may not admit a run of now (FairShareAdmission.claimable).
        .where(_Q.c.tenant_id.not_in(bindparam("b_skip", expanding=True)))
        .order_by(_Q.c.priority.desc(), _Q.c.finish_tag, _Q.c.run_id)
        .limit(bindparam("b_scan"))
    )


#: Claim candidates per dialect; PostgreSQL skips rows other workers are picking.
_CANDIDATES = {
    "sqlite": _candidates(),
    "postgresql": _candidates().with_for_update(skip_locked=True, of=_Q),
}
_TAKE = (
    update(_Q)
    .where(
        _Q.c.tenant_id == bindparam("b_tenant"), _Q.c.run_id == bindparam("b_run"), _Q.c.claimed_by.is_(None)
    )
    .values(claimed_by=bindparam("b_holder"), lease_until=bindparam("b_until"))
)
_ADVANCE_CLOCK = (
    update(_QC)
    .where(_QC.c.id == 1, _QC.c.virtual_time < bindparam("b_tag"))
    .values(virtual_time=bindparam("b_tag"))
)
_EXPIRED = and_(_Q.c.claimed_by.is_not(None), _Q.c.lease_until < bindparam("b_now"))
#: Whether any lease expired (read before taking a write lock: usually none did).
_ANY_EXPIRED = select(_Q.c.run_id).where(_EXPIRED).limit(1)


def _expired() -> Any:
    return (
        select(
            _Q.c.tenant_id,
            _Q.c.run_id,
            _Q.c.claimed_by,
            _Q.c.finish_tag,
            _Q.c.reserved_tokens,
            _Q.c.quota_period,
            _Q.c.used_input_tokens,
            _Q.c.used_output_tokens,
            _Q.c.used_tool_calls,
        )
        .where(_EXPIRED)
        .order_by(_Q.c.tenant_id, _Q.c.run_id)
    )


#: Expired entries per dialect. PostgreSQL locks them (skipping rows another reaper or
#: their renewing worker holds), so two reapers never both put back, and charge, one run.
#: SQLite serialises reapers by taking the write lock first (FairRunQueue._begin_write).
_EXPIRED_ENTRIES = {"sqlite": _expired(), "postgresql": _expired().with_for_update(skip_locked=True)}
#: One expired entry, still held by the same holder (``b_holder``).
_ENTRY_OF_HOLDER = and_(
    _Q.c.tenant_id == bindparam("b_tenant"),
    _Q.c.run_id == bindparam("b_run"),
    _Q.c.claimed_by == bindparam("b_holder"),
)
_DROP_HOLD = delete(_Q).where(_ENTRY_OF_HOLDER)
_PUT_BACK_EXPIRED = (
    update(_Q)
    .where(_ENTRY_OF_HOLDER)
    .values(claimed_by=None, lease_until=None, used_input_tokens=0, used_output_tokens=0, used_tool_calls=0)
)
#: The holder's attempt's unspent usage on its entry, while the entry is its claim.
_RECORD_USAGE = (
    update(_Q)
    .where(_ENTRY_OF_HOLDER)
    .values(
        used_input_tokens=bindparam("b_input"),
        used_output_tokens=bindparam("b_output"),
        used_tool_calls=bindparam("b_tools"),
    )
)


def worker_id(kind: str = "worker") -> str:
    """A holder name unique to this process: ``<kind>:<host>:<pid>``."""
    return f"{kind}:{socket.gethostname()}:{os.getpid()}"[:80]


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A run taken from the queue by a worker.

    Attributes:
        weight: the tenant's plan weight, for the worker's fair-share admission.
        input_tokens, output_tokens, tool_calls: on a claim whose lease expired, as
            :meth:`FairRunQueue.requeue_expired` hands it over, the usage its holder's
            attempt had recorded on the entry (:meth:`FairRunQueue.record_usage`) and not
            yet spent in the token ledger; 0 otherwise.
    """

    tenant_id: str
    run_id: str
    finish_tag: float
    holder: str
    reserved_tokens: int
    quota_period: str
    weight: int = 1
    input_tokens: int = 0
    output_tokens: int = 0
    tool_calls: int = 0


class FairRunQueue:
    """Weighted fair queue of runs over the shared database (see the module docstring)."""

    def __init__(self, backend: SqlBackend) -> None:
        self._backend = backend
        self._postgres = backend.engine.dialect.name == "postgresql"

    # -- enqueue ----------------------------------------------------------------------

    def enqueue(
        self,
        tenant_id: str,
        run_id: str,
        *,
        weight: int,
        max_running: int,
        reserved_tokens: int,
        quota_period: str,
        priority: int = 0,
        conn: Connection | None = None,
    ) -> float:
        """Queue a run; returns its virtual finish tag.

        Args:
            weight: the tenant's share (plan weight), >= 1.
            priority: strict tier; higher is dispatched first.
            max_running: the tenant's cap on runs held at once.
            reserved_tokens: tokens reserved at admission, settled by the worker.
            quota_period: the budget period the reservation was made in.
            conn: a control-plane transaction to join (the run's admission).
        """
        with self._backend.control_tx(conn) as conn:
            self._begin_write(conn)
            last = self._lock_tenant(conn, tenant_id)
            vt = float(
                conn.execute(select(s.queue_clock.c.virtual_time).where(s.queue_clock.c.id == 1)).scalar_one()
            )
            tag = max(last, vt) + 1.0 / max(1, weight)
            conn.execute(
                update(s.queue_tenants).where(s.queue_tenants.c.tenant_id == tenant_id).values(last_tag=tag)
            )
            conn.execute(
                insert(s.run_queue).values(
                    tenant_id=tenant_id,
                    run_id=run_id,
                    priority=priority,
                    finish_tag=tag,
                    max_running=max_running,
                    reserved_tokens=reserved_tokens,
                    quota_period=quota_period,
                    enqueued_at=utcnow(),
                    claimed_by=None,
                    lease_until=None,
                )
            )
            self._notify(conn)
        return tag

    def _notify(self, conn: Connection) -> None:
        """PostgreSQL: wake idle workers of every process when ``conn``'s transaction commits."""
        if self._postgres:
            conn.execute(_NOTIFY)

    def listen(self, on_notify: Callable[[], object]) -> QueueListener | None:
        """Call ``on_notify()`` (from a background thread) whenever any process queues or
        puts back a run, and once as soon as the listener is connected (runs may have been
        queued before); ``None`` on SQLite, which has no channel across processes.

        Returns:
            The running listener; :meth:`QueueListener.close` stops it.
        """
        if not self._postgres:
            return None
        return QueueListener(self._backend.engine, on_notify)

    def _begin_write(self, conn: Connection) -> None:
        """SQLite: take the database's write lock first, so the reads that follow (counts,
        candidates) and the writes they decide happen as one serialised transaction across
        processes. PostgreSQL uses row locks instead. Creates the virtual-time row if missing."""
        conn.execute(_ENSURE_CLOCK[conn.dialect.name])
        if not self._postgres:
            conn.execute(_TOUCH_CLOCK)

    def _ensure_tenant_row(self, conn: Connection, tenant_id: str) -> None:
        """Create the tenant's queue row if it is missing (one statement, a write)."""
        execute_write(conn, _ENSURE_TENANT[conn.dialect.name], {"tenant_id": tenant_id, "last_tag": 0.0})

    def _lock_tenant(self, conn: Connection, tenant_id: str) -> float:
        """Lock (creating if needed) the tenant's queue row; returns its last finish tag."""
        last = conn.execute(_LOCK_TENANT, {"b_tenant": tenant_id}).scalar()
        if last is None:
            self._ensure_tenant_row(conn, tenant_id)
            last = conn.execute(_LOCK_TENANT, {"b_tenant": tenant_id}).scalar_one()
        return float(last)

    # -- holds (synchronous runs) -----------------------------------------------------

    def hold(
        self,
        tenant_id: str,
        run_id: str,
        *,
        max_running: int,
        holder: str,
        lease_s: float = 300.0,
        reserved_tokens: int = 0,
        quota_period: str = "",
        conn: Connection | None = None,
    ) -> None:
        """Count a synchronous run against the tenant's cap, across every process.

        Args:
            reserved_tokens: tokens reserved for the run, and ``quota_period`` the budget
                period they were reserved in: kept on the hold so that whoever drops it
                after its holder died (:meth:`requeue_expired`) can settle them.

        Raises:
            ConcurrencyLimited: the tenant already holds ``max_running`` runs.
        """
        with self._backend.control_tx(conn) as conn:
            # PostgreSQL: the tenant's queue row is the lock (_lock_tenant creates it if
            # missing, locks it FOR UPDATE). SQLite: the conditional insert below is one
            # statement, and a writing statement takes the database's write lock before it
            # reads, so no other hold or claim can come between its count and its insert.
            if self._postgres:
                self._lock_tenant(conn, tenant_id)
            now = utcnow()
            row = {
                "tenant_id": tenant_id,
                "run_id": run_id,
                "priority": 0,
                "finish_tag": 0.0,
                "max_running": max_running,
                "reserved_tokens": reserved_tokens,
                "quota_period": quota_period,
                "enqueued_at": now,
                "claimed_by": holder,
                "lease_until": now + timedelta(seconds=lease_s),
            }
            if self._postgres:  # the row lock above orders the count and the insert
                admitted = self._held(conn, tenant_id) < max_running
                if admitted:
                    execute_write(conn, _INSERT_ENTRY, row)
            else:
                params = {**row, "b_tenant": tenant_id, "b_cap": max_running}
                admitted = execute_write(conn, _HOLD_UNDER_CAP, params) == 1
            if admitted:
                return
            held = self._held(conn, tenant_id)  # for the refusal's message only
            raise ConcurrencyLimited(
                f"{held} runs in flight; the limit is {max_running}",
                tenant_id=tenant_id,
                limit=max_running,
                in_flight=held,
                retry_after_s=1,
            )

    @staticmethod
    def _held(conn: Connection, tenant_id: str) -> int:
        return int(conn.execute(_HELD, {"b_tenant": tenant_id}).scalar_one())

    # -- workers ----------------------------------------------------------------------

    def claim(
        self,
        holder: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        scan: int = 16,
        skip: Collection[str] = (),
    ) -> Claim | None:
        """Take the next run in fair order whose tenant is active and under its cap.

        Args:
            holder: the worker's name, stored on the claimed row.
            lease_s: the claim's lease, seconds.
            scan: candidates read per attempt (runs of tenants at their cap are skipped).
            skip: tenants whose runs not to claim (those at their fair share of the
                worker's process, :meth:`patinox.limits.FairShareAdmission.claimable`).

        The claim carries the tenant's plan weight, for the worker's admission.

        Returns ``None`` when nothing is claimable now. When no run waits at all, that is
        one index read and no write lock, so idle workers polling cost the database little.
        """
        with self._backend.transaction() as conn:
            if conn.execute(_ANY_WAITING).first() is None:
                return None
        with self._backend.transaction() as conn:
            self._begin_write(conn)
            params = {"b_scan": scan, "b_skip": list(skip)}
            rows = conn.execute(_CANDIDATES[conn.dialect.name], params).all()
            full: set[str] = set()
            for tenant_id, run_id, tag, max_running, reserved, period, plan in rows:
                if tenant_id in full:
                    continue
                if conn.execute(_TRY_LOCK_TENANT, {"b_tenant": tenant_id}).first() is None:
                    full.add(tenant_id)  # locked by another claim, hold or enqueue: next time
                    continue
                if self._held(conn, tenant_id) >= max_running:
                    full.add(tenant_id)
                    continue
                until = utcnow() + timedelta(seconds=lease_s)
                params = {"b_tenant": tenant_id, "b_run": run_id, "b_holder": holder, "b_until": until}
                if conn.execute(_TAKE, params).rowcount != 1:
                    continue
                conn.execute(_ADVANCE_CLOCK, {"b_tag": tag})
                return Claim(
                    tenant_id=tenant_id,
                    run_id=run_id,
                    finish_tag=float(tag),
                    holder=holder,
                    reserved_tokens=int(reserved),
                    quota_period=str(period),
                    weight=get_plan(str(plan)).weight,
                )
        return None

    def retune(self, tenant_id: str, *, max_running: int, priority: int) -> None:
        """Apply a tenant's new concurrency cap and priority to its queued runs (its weight
        applies to runs queued from now on)."""
        q = s.run_queue
        with self._backend.transaction() as conn:
            conn.execute(
                update(q)
                .where(q.c.tenant_id == tenant_id, q.c.finish_tag > 0)
                .values(max_running=max_running, priority=priority)
            )
            conn.execute(
                update(q)
                .where(q.c.tenant_id == tenant_id, q.c.finish_tag == 0)
                .values(max_running=max_running)
            )

    def renew(self, claims: list[Claim], *, lease_s: float = DEFAULT_LEASE_S) -> None:
        """Extend the leases of runs still being worked on."""
        if not claims:
            return
        q = s.run_queue
        until = utcnow() + timedelta(seconds=lease_s)
        with self._backend.transaction() as conn:
            for c in claims:
                conn.execute(
                    update(q)
                    .where(q.c.tenant_id == c.tenant_id, q.c.run_id == c.run_id, q.c.claimed_by == c.holder)
                    .values(lease_until=until)
                )

    def put_back(self, claim: Claim) -> bool:
        """Give an unstarted claim back to the queue, in its place and with its reservation,
        while it is still ``claim.holder``'s (a run whose tenant was suspended between its
        claim and its start waits for the tenant's resumption like its other queued runs).

        Returns:
            Whether the claim was given back (False: its lease had expired meanwhile).
        """
        q = s.run_queue
        with self._backend.transaction() as conn:
            back = conn.execute(
                update(q)
                .where(
                    q.c.tenant_id == claim.tenant_id,
                    q.c.run_id == claim.run_id,
                    q.c.claimed_by == claim.holder,
                )
                .values(claimed_by=None, lease_until=None)
            ).rowcount
            if back:
                self._notify(conn)
        return bool(back)

    def release(
        self, tenant_id: str, run_id: str, *, holder: str | None = None, conn: Connection | None = None
    ) -> bool:
        """Remove a finished run (or a synchronous hold) from the queue.

        Args:
            holder: a worker's name: remove the run only while it is still that worker's
                claim. A worker whose lease expired (it stalled, and the run was put back
                or claimed by another worker) then removes nothing.

        Returns:
            Whether a queue entry was removed.
        """
        params = {"b_tenant": tenant_id, "b_run": run_id}
        with self._backend.control_tx(conn) as conn:
            if holder is None:
                return execute_write(conn, _RELEASE, params) == 1
            return execute_write(conn, _RELEASE_CLAIM, {**params, "b_holder": holder}) == 1

    def record_usage(
        self,
        claim: Claim,
        *,
        input_tokens: int,
        output_tokens: int,
        tool_calls: int,
        conn: Connection | None = None,
    ) -> bool:
        """Write the usage of ``claim.holder``'s attempt not yet spent in the token ledger
        on the run's entry (tokens, tool calls), while the entry is still that holder's
        claim; in ``conn`` when given. If the holder dies, :meth:`requeue_expired` hands
        these figures to its caller to charge. Writing zeros says they were spent.

        Returns:
            Whether the entry is still the holder's claim (False: its lease expired and
            the run was put back, with whatever the entry held then).
        """
        params = {
            "b_tenant": claim.tenant_id,
            "b_run": claim.run_id,
            "b_holder": claim.holder,
            "b_input": input_tokens,
            "b_output": output_tokens,
            "b_tools": tool_calls,
        }
        with self._backend.control_tx(conn) as conn:
            return execute_write(conn, _RECORD_USAGE, params) == 1

    def requeue_expired(
        self,
        now: datetime | None = None,
        *,
        on_requeue: Callable[[Connection, list[Claim]], None] | None = None,
    ) -> tuple[int, list[Claim]]:
        """Put runs whose lease expired (their worker died) back in the queue, keeping
        their place and their reservation, and drop expired synchronous holds (their API
        process died). One transaction; several reapers never take the same entry.

        Args:
            now: the time leases are compared with (UTC; default the present).
            on_requeue: called, inside that transaction, with the runs being put back:
                claims of their dead holder, with the usage its attempt had recorded and
                not spent (:meth:`record_usage`), which the entry no longer holds once the
                transaction commits. Charging it in the same transaction (the token
                ledger is in this database) charges it exactly once.

        Returns:
            (runs put back, the dropped synchronous holds as claims of their dead holder:
            ``finish_tag`` 0, with the tokens reserved for the run and their period, which
            the caller settles).
        """
        params = {"b_now": now or utcnow()}
        with self._backend.transaction() as conn:
            if conn.execute(_ANY_EXPIRED, params).first() is None:
                return 0, []
        with self._backend.transaction() as conn:
            if not self._postgres:  # PostgreSQL locks the entries it reads instead
                self._begin_write(conn)
            expired = [
                Claim(
                    tenant_id=str(t),
                    run_id=str(r),
                    finish_tag=float(tag),
                    holder=str(h),
                    reserved_tokens=int(n),
                    quota_period=str(period),
                    input_tokens=int(i),
                    output_tokens=int(o),
                    tool_calls=int(c),
                )
                for t, r, h, tag, n, period, i, o, c in conn.execute(
                    _EXPIRED_ENTRIES[conn.dialect.name], params
                )
            ]
            holds, back = [], []
            for c in expired:
                key = {"b_tenant": c.tenant_id, "b_run": c.run_id, "b_holder": c.holder}
                if c.finish_tag == 0.0:
                    execute_write(conn, _DROP_HOLD, key)
                    holds.append(c)
                else:
                    execute_write(conn, _PUT_BACK_EXPIRED, key)
                    back.append(c)
            if back:
                if on_requeue is not None:
                    on_requeue(conn, back)
                self._notify(conn)
        return len(back), holds

    # -- cancel -----------------------------------------------------------------------

    def cancel_queued(self, tenant_id: str, run_id: str, *, conn: Connection | None = None) -> Claim | None:
        """Take a run that waits unclaimed out of the queue (its tenant cancelled it), in
        ``conn`` when given. No worker can claim it after this.

        Returns:
            The removed entry as a claim (``holder`` empty) with the tokens reserved for the
            run and their period, which the caller settles; ``None`` when the run does not
            wait (a worker claimed it, it is a synchronous hold, or it left the queue).
        """
        waiting = and_(_Q.c.tenant_id == tenant_id, _Q.c.run_id == run_id, _Q.c.claimed_by.is_(None))
        with self._backend.control_tx(conn) as conn:
            row = conn.execute(
                delete(_Q).where(waiting).returning(_Q.c.finish_tag, _Q.c.reserved_tokens, _Q.c.quota_period)
            ).first()
        if row is None:
            return None
        return Claim(
            tenant_id=tenant_id,
            run_id=run_id,
            finish_tag=float(row[0]),
            holder="",
            reserved_tokens=int(row[1]),
            quota_period=str(row[2]),
        )

    def request_cancel(self, tenant_id: str, run_id: str) -> bool:
        """Ask whichever process holds the run (a worker's claim or a synchronous hold) to
        cancel it: marks its entry, which that process polls (:meth:`cancel_requested`).

        Returns:
            Whether the run is held (False: it is not in the queue, or waits unclaimed).
        """
        held = and_(_Q.c.tenant_id == tenant_id, _Q.c.run_id == run_id, _Q.c.claimed_by.is_not(None))
        with self._backend.transaction() as conn:
            marked = conn.execute(update(_Q).where(held).values(cancel_requested_at=utcnow())).rowcount
        return bool(marked)

    def cancel_requested(self, runs: Collection[tuple[str, str]]) -> set[str]:
        """Of ``runs`` (``(tenant_id, run_id)`` pairs: a process's runs in flight), the ids
        of those whose cancel was requested (:meth:`request_cancel`). One read by primary key."""
        if not runs:
            return set()
        tenants = sorted({t for t, _ in runs})
        ids = sorted({r for _, r in runs})
        q = select(_Q.c.tenant_id, _Q.c.run_id).where(
            _Q.c.tenant_id.in_(tenants), _Q.c.run_id.in_(ids), _Q.c.cancel_requested_at.is_not(None)
        )
        wanted = set(runs)
        with self._backend.transaction() as conn:
            return {str(r) for t, r in conn.execute(q) if (t, r) in wanted}

    # -- views ------------------------------------------------------------------------

    def depth(self, tenant_id: str | None = None) -> int:
        """Runs waiting (not claimed), of one tenant or all."""
        q = s.run_queue
        cond: list[ColumnElement[bool]] = [q.c.claimed_by.is_(None)]
        if tenant_id is not None:
            cond.append(q.c.tenant_id == tenant_id)
        with self._backend.transaction() as conn:
            return int(conn.execute(select(func.count()).where(*cond)).scalar_one())

    def held(self, tenant_id: str) -> int:
        """Runs of the tenant held now (claimed by workers or admitted synchronously)."""
        with self._backend.transaction() as conn:
            return self._held(conn, tenant_id)
