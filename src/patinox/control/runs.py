"""The path of one run: admission, execution by the tenant's executor, settlement.

:class:`RunService` orchestrates the three steps; each has its own module:

1. Admission (:mod:`patinox.control.admission`) — the agent's run rate, the tenant's
   state, this process's fair share, the daily quotas and the run's slot; it returns a
   ticket of what the run holds. Refusals end here, before any model call.
2. Execution — the executor for the tenant's isolation level (:class:`RunExecutor`) runs
   the agent with the tenant context passed explicitly.
3. Settlement (:mod:`patinox.control.settlement`) — the run's result, usage and audit
   records are written and its ticket settled to actual usage, in one transaction where
   the tenant's storage model allows it.

Asynchronous runs (``mode="async"``) are admitted (tokens reserved), written to the
durable fair queue and answered at once; a worker (in this process or another) claims
and executes them later, and settles their reservation. A restart loses none; a run
whose worker died is executed again by another (at-least-once execution): each execution
is an attempt, recorded on the run and charged what it used (see
:class:`~patinox.control.settlement.Attempt` and :meth:`RunService.reap_expired`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

import structlog
from pydantic import BaseModel, ConfigDict, Field
from pydantic_ai.usage import RunUsage

from patinox.agents import (
    AgentDefinition,
    Conversation,
    HttpFetcher,
    MemoryStore,
    RunEvent,
    RunLimits,
    RunOutcome,
    check_tools_allowed,
    is_simulated,
    run_agent,
)
from patinox.agents.runner import Role
from patinox.control.admission import TOOL_CALL_TOKENS, RunAdmission, run_limits, worst_case_tokens
from patinox.control.inflight import (
    CANCELLED_BY_REQUEST,
    RunsInFlight,
    RunTask,
    stop_reason_of_current_task,
)
from patinox.control.secrets import SecretService, provider_key_name
from patinox.control.settlement import (
    Attempt,
    RunEvents,
    Settlement,
    Ticket,
    cancelled_values,
    failed_values,
    finish_audit,
    usage_record,
)
from patinox.control.tenants import TenantEvent
from patinox.errors import InvalidRequest, NotFound, PatinoxError, RunFailed, RunFinished
from patinox.limits import (
    Claim,
    FairRunQueue,
    FairShareAdmission,
    InlineStorage,
    RateLimiter,
    RateLimitState,
    StorageCalls,
    TokenBudget,
    WindowRateLimiter,
    worker_id,
)
from patinox.storage import (
    AgentRecord,
    PreparedWrite,
    RunRecord,
    SqlBackend,
    TenantStore,
    UsageRecord,
    utcnow,
)
from patinox.tenancy import (
    IsolationLevel,
    TenantContext,
    check_model_allowed,
    effective_limits,
    get_plan,
    new_id,
)

log = structlog.get_logger("patinox.runs")

__all__ = [
    "TOOL_CALL_TOKENS",
    "ClosableExecutor",
    "RunExecutor",
    "RunRequest",
    "RunService",
    "worst_case_tokens",
]


#: Seconds :meth:`RunService.cancel` waits for another process to settle a run it cancels.
_REMOTE_CANCEL_WAIT_S = 5.0


class RunExecutor(Protocol):
    """Runs one agent for one tenant at that tenant's isolation level.

    ``execute`` returns the awaitable of the run (an ``async def`` method qualifies); it may
    raise at once, before the run starts, or when awaited. The run adds its usage to
    ``usage`` as it goes (see :func:`patinox.agents.run_agent`), so a cancelled run's
    tokens so far can be charged, and calls ``on_usage(usage)`` after each step of the
    agent loop (each model response, before acting on it), so that a worker can record
    them where they outlive its process. ``history`` (given only when there is one) holds
    earlier turns of a conversation, oldest first, passed to the model as message history.
    """

    def execute(
        self,
        ctx: TenantContext,
        definition: AgentDefinition,
        prompt: str,
        *,
        output_tokens: int | None,
        limits: RunLimits,
        memory: MemoryStore,
        usage: RunUsage | None = None,
        on_usage: Callable[[RunUsage], None] | None = None,
        history: tuple[tuple[Role, str], ...] = (),
    ) -> Awaitable[RunOutcome]: ...


@runtime_checkable
class ClosableExecutor(Protocol):
    """An executor holding resources beyond a run (execution processes, their template):
    :meth:`RunService.shutdown` closes it after the last run."""

    async def aclose(self) -> None: ...


class RunRequest(BaseModel):
    """A run as a tenant asks for it."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1, max_length=1_000_000, description="the user prompt")
    output_tokens: int | None = Field(
        default=None, ge=1, strict=True, description="output tokens to ask the model for (simulated: exact)"
    )
    mode: Literal["sync", "async", "stream"] = Field(
        default="sync",
        description="`sync`: answer the finished run; `async`: queue it and answer at once; "
        "`stream`: a synchronous run answered as server-sent events (namespace level)",
    )


#: Seconds a synchronous run's concurrency hold outlives the run's timeout (settlement).


class RunService:
    """Admits, executes and settles runs. One per process (API server or worker).

    Synchronous runs execute in the admitting process; asynchronous runs are written to
    the durable fair queue (:class:`~patinox.limits.FairRunQueue`) and executed by
    whichever worker claims them (:class:`RunWorker`, in the API process or in
    ``patinox worker`` processes). Both count against the tenant's concurrent-run cap
    through the same queue table, so the cap holds across every process.

    Args:
        backend: the deployment's storage.
        executor: runs an agent at the tenant's isolation level.
        queue: the shared run queue.
        budget: the daily quotas.
        holder: this process's name on the runs it holds.
        admission: this process's fair share of its own capacity; ``None`` admits every
            run at once.
        rate: the deployment's rate-limit store, for each agent's run rate (default: one
            in this process's memory).
        calls: where the run path's storage calls are made (:attr:`calls`; default: on the
            event loop, :class:`~patinox.limits.InlineStorage`).
        fetcher: the ``http_fetch`` tool's requests for a tenant, for the runs with a
            conversation this service runs itself (the executors have their own); ``None``:
            no egress in those runs.
    """

    def __init__(
        self,
        backend: SqlBackend,
        executor: RunExecutor,
        *,
        queue: FairRunQueue,
        budget: TokenBudget,
        holder: str | None = None,
        admission: FairShareAdmission | None = None,
        rate: RateLimiter | None = None,
        calls: StorageCalls | None = None,
        fetcher: Callable[[TenantContext], HttpFetcher] | None = None,
    ) -> None:
        self._backend = backend
        self._secrets = SecretService(backend)
        self._fetcher = fetcher
        #: Where the run path's storage calls are made: the lookup of a run's agent (with
        #: the agent's rate), its admission, a claimed run's reading, its settlement. Each
        #: is one call, so moving them off the event loop
        #: (:class:`~patinox.limits.FairStorageExecutor`) is this one object. Admission and
        #: settlement go through ``finish``: once asked, they run to their end however the
        #: run's task is cancelled meanwhile, and a run admitted so is settled (once).
        self.calls: StorageCalls = calls or InlineStorage()
        self._executor = executor
        self.queue = queue
        self._budget = budget
        self.holder = holder or worker_id("api")
        self._admit = RunAdmission(
            backend=backend,
            queue=queue,
            budget=budget,
            rate=rate or WindowRateLimiter(),
            fair_share=admission,
            holder=self.holder,
        )
        self._settlement = Settlement(backend, budget, queue)
        #: The runs executing in this process, by tenant: what stops them.
        self.inflight = RunsInFlight(self._admit.fenced)
        self._wakeup: asyncio.Event | None = None

    def set_run_events(self, events: RunEvents | None) -> None:
        """Tell ``events`` of every run this service settles (the webhook outbox; see
        :data:`~patinox.control.settlement.RunEvents`)."""
        self._settlement.events = events

    @property
    def admission(self) -> FairShareAdmission | None:
        """This process's fair share of its own capacity; ``None`` admits every run at once."""
        return self._admit.fair_share

    async def start(
        self,
        ctx: TenantContext,
        agent_id: str,
        req: RunRequest,
        *,
        rate_states: list[RateLimitState] | None = None,
        conversation: Conversation | None = None,
    ) -> RunRecord:
        """Admit a run; for ``sync`` wait for and return the finished run, for ``async``
        queue it and return the queued run at once.

        Args:
            rate_states: where to add the agent's rate-limit state (the HTTP route's
                ``RateLimit`` headers), refused or not.
            conversation: earlier turns and a stream callback (a synchronous run; with a
                stream callback at the ``namespace`` level only, which runs in this
                process; its turns alone reach the execution process of the other levels);
                its turns count in the run's token reservation. ``None``: the input alone.

        Raises:
            RateLimited: the agent's run rate (``per_agent_rpm``) is spent.
            TenantSuspended: the tenant is suspended (fenced in this process).
            NotFound: no such agent for this tenant.
            InvalidRequest: output_tokens above the agent's or plan's cap; a conversation
                for an asynchronous run, or a streamed one for a tenant at another level
                than ``namespace`` (field ``isolation_level``).
            ConcurrencyLimited, QuotaExceeded: admission refused; nothing was run or stored.
            Overloaded: a synchronous run's turn in this process's fair share did not come
                in time; nothing was run or stored.
            ExceedsBudget: the run's worst case is more than the whole daily token budget
                (no day admits it); nothing was run, stored or counted.
            ToolNotAllowed: the agent names a tool the tenant's ``allowed_tools`` no longer
                lists; nothing was run or stored.
            RunFailed: a synchronous run failed (the run is recorded with its error).
        """
        if conversation is not None and req.mode != "sync":
            raise InvalidRequest(
                "a conversation is run synchronously only", field="conversation", mode=req.mode
            )
        if (
            conversation is not None
            and conversation.on_event is not None
            and ctx.isolation_level is not IsolationLevel.NAMESPACE
        ):
            raise InvalidRequest(
                "streamed runs execute at the 'namespace' isolation level only; "
                f"this tenant runs at {ctx.isolation_level.value!r}",
                field="conversation",
                isolation_level=ctx.isolation_level.value,
            )
        store, agent = await self.calls.call(ctx.tenant_id, self._look_up, ctx, agent_id, req, rate_states)
        # The allow-list may have changed since the agent was defined: refused before admission.
        check_model_allowed(agent["model"], ctx.limits, tenant_id=ctx.tenant_id)
        check_tools_allowed(agent["tools"], ctx.limits.allowed_tools)  # the list may have changed
        limits = run_limits(ctx, agent)
        if req.output_tokens is not None and req.output_tokens > limits.max_output_tokens:
            raise InvalidRequest(
                f"output_tokens {req.output_tokens} is above this agent's limit of "
                f"{limits.max_output_tokens}",
                field="output_tokens",
            )
        prompt = req.input if conversation is None else f"{conversation.text()}\n{req.input}"
        worst_case = worst_case_tokens(agent, prompt, req.output_tokens, limits)
        limits = dataclasses.replace(limits, max_total_tokens=worst_case)
        if req.mode == "async":
            queued = await self.calls.finish(ctx.tenant_id, self._enqueue, ctx, store, agent, req, worst_case)
            if self._wakeup is not None:
                self._wakeup.set()
            return queued
        # The fair share first: the turn is freed when the run is answered (a caller that
        # went away: when its run was told to stop, a moment before its settlement ends).
        turn = await self._admit.take_turn(ctx)
        try:
            return await self._run_now(ctx, store, agent, req, limits, conversation)
        finally:
            if turn:
                self._admit.end_turn(ctx.tenant_id)

    def _look_up(
        self, ctx: TenantContext, agent_id: str, req: RunRequest, rate_states: list[RateLimitState] | None
    ) -> tuple[TenantStore, AgentRecord]:
        """Steps 1 and 2 of admission, then the run's agent (one storage call)."""
        self._admit.check(ctx, agent_id, rate_states, queued=req.mode == "async")
        store = self._backend.tenant_store(ctx)
        return store, store.get_agent(agent_id)

    @staticmethod
    def _new_run(
        ctx: TenantContext, store: TenantStore, agent: AgentRecord, req: RunRequest, run_id: str
    ) -> tuple[RunRecord, PreparedWrite]:
        """The run row and its prepared insert (sealed outside any transaction)."""
        sync = req.mode == "sync"
        return store.prepare_run(
            {
                "id": run_id,
                "agent_id": agent["id"],
                "principal": ctx.principal,
                "mode": req.mode,
                "status": "running" if sync else "queued",
                "input": req.input,
                "requested_output_tokens": req.output_tokens,
                "model": agent["model"],
                "simulated": int(is_simulated(agent["model"])),
                "input_tokens": 0,
                "output_tokens": 0,
                "tool_calls": 0,
                "created_at": (now := utcnow()),
                "started_at": now if sync else None,
            }
        )

    def _enqueue(
        self, ctx: TenantContext, store: TenantStore, agent: AgentRecord, req: RunRequest, worst_case: int
    ) -> RunRecord:
        """Admit an asynchronous run (quotas, tokens) and queue it with its row."""
        run, insert_run = self._new_run(ctx, store, agent, req, new_id("run"))
        admit = self._admit
        self._settlement.open(
            store,
            insert_run,
            lambda conn: admit.reserve(ctx, run["id"], worst_case, conn),
            lambda ticket, conn: admit.enqueue(ctx, ticket, conn),
        )
        return run

    async def _run_now(
        self,
        ctx: TenantContext,
        store: TenantStore,
        agent: AgentRecord,
        req: RunRequest,
        limits: RunLimits,
        conversation: Conversation | None = None,
    ) -> RunRecord:
        """Admit a synchronous run (quotas, tokens, slot) with its row, run it here and
        return it settled."""
        run, insert_run = self._new_run(ctx, store, agent, req, new_id("run"))
        run_id: str = run["id"]
        tokens, timeout_s = limits.max_total_tokens or 0, limits.timeout_s
        opened: list[Ticket] = []

        def admit() -> Ticket:
            ticket = self._settlement.open(
                store, insert_run, lambda conn: self._admit.hold(ctx, run_id, tokens, timeout_s, conn)
            )
            opened.append(ticket)
            return ticket

        try:
            ticket = await self.calls.finish(ctx.tenant_id, admit)
        except asyncio.CancelledError:
            if opened:  # admitted, then the caller went away: the run never starts
                await self.calls.finish(
                    ctx.tenant_id, self._settlement.settle_unstarted, opened[0], store, ctx, run
                )
            raise
        # From admission to here nothing awaited, so a tenant fenced by stop_tenant() after
        # this point finds this run among its tasks.
        job = self._execute(
            ctx, store, agent, run, req.input, req.output_tokens, limits, ticket, conversation
        )
        task = self._track(job, ctx, store, run, ticket)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                task.cancel()  # the caller went away: stop its run too
                raise
            if (current := asyncio.current_task()) and current.cancelling():
                raise
            if task.stop_reason is not None:
                reason, message = task.stop_reason
                raise RunFailed(message, reason=reason, run_id=run_id) from None
            raise RunFailed(
                "the run was stopped because its tenant was suspended or deleted",
                reason="tenant_stopped",
                run_id=run_id,
            ) from None

    async def execute_claim(self, claim: Claim) -> RunRecord | None:
        """Run a queued run a worker claimed; settle its tokens and release it.

        Returns the finished run, or ``None`` when the run or its tenant is gone (the
        queue entry is dropped and its reservation returned) or the tenant is no longer
        active (the run is put back in the queue, unstarted, with its reservation).
        """
        ticket = self._admit.claimed(claim)
        started = await self.calls.finish(claim.tenant_id, self._claimed, claim, ticket)
        if not isinstance(started, tuple):
            return started
        ctx, store, agent, run, limits = started
        job = self._execute(
            ctx, store, agent, run, run["input"], run["requested_output_tokens"], limits, ticket
        )
        task = self._track(job, ctx, store, run, ticket)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                task.cancel()
                raise
            return None

    def _claimed(
        self, claim: Claim, ticket: Ticket
    ) -> RunRecord | tuple[TenantContext, TenantStore, AgentRecord, RunRecord, RunLimits] | None:
        """A claimed run's reading and its attempt's start (one storage call): what to
        execute, or what :meth:`execute_claim` returns when there is nothing to execute."""
        try:
            tenant = self._backend.get_tenant(claim.tenant_id)
            store = self._backend.acting_on(claim.tenant_id)
            run = store.get_run(claim.run_id)
            agent = store.get_agent(run["agent_id"])
        except NotFound:
            self._settlement.release(ticket, 0)
            return None
        if run["status"] not in ("queued", "running"):
            self._settlement.release(ticket, 0)  # finished by a worker that died before releasing it
            return run
        refusal = self._admit.refusal_of_claim(tenant, str(run["principal"]))
        if refusal == "suspended":
            self.queue.put_back(claim)
            return None
        if refusal is not None:
            values: RunRecord = {
                "status": "failed",
                "finished_at": utcnow(),
                "error": {
                    "code": "run_failed",
                    "reason": "key_revoked",
                    "message": "the key that queued this run was revoked",
                },
            }
            store.update_run(run["id"], values)
            self._settlement.release(ticket, 0)
            return {**run, **values}
        ctx = TenantContext.for_tenant(tenant, principal=run["principal"], scopes={"runs:write"})
        store = self._backend.tenant_store(ctx)  # with the tenant's quotas (memory_bytes)
        ticket.joined = self._settlement.joins(store)
        limits = dataclasses.replace(run_limits(ctx, agent), max_total_tokens=claim.reserved_tokens)
        ticket.attempt = Attempt(
            claim,
            store.start_attempt(run["id"], holder=claim.holder),
            backend=self._backend,
            queue=self.queue,
            budget=self._budget,
        )
        return ctx, store, agent, run, limits

    def _track(
        self,
        job: Coroutine[Any, Any, RunRecord],
        ctx: TenantContext,
        store: TenantStore,
        run: RunRecord,
        ticket: Ticket,
    ) -> RunTask:
        """``job`` as a task among the tenant's runs in flight (:attr:`inflight`); if the
        task ends cancelled before its first step, its run is settled as such
        (:meth:`Settlement.settle_unstarted`)."""
        return self.inflight.track(
            job,
            tenant_id=ctx.tenant_id,
            level=ctx.isolation_level.value,
            run_id=run["id"],
            on_unstarted=lambda: self._settlement.settle_unstarted(ticket, store, ctx, run),
        )

    async def stop_tenant(self, tenant_id: str) -> int:
        """Fence the tenant (no new run starts in this process) and cancel its runs in
        flight here, waiting until each is recorded as failed. Returns how many."""
        return await self.inflight.stop_tenant(tenant_id)

    async def stop_stale(self, tenant_id: str, level: str) -> int:
        """Cancel the tenant's runs in flight here that execute at another isolation level
        than ``level`` (its new one), each failed with reason ``isolation_level_change``,
        and wait until each is settled. Returns how many."""
        return await self.inflight.stop_stale(tenant_id, level)

    async def cancel(self, ctx: TenantContext, run_id: str, *, _again: bool = True) -> tuple[RunRecord, bool]:
        """Cancel one of the tenant's runs, queued or running, wherever it runs; audited
        (``run.cancel``). Its storage calls go through :attr:`calls` (off the event loop
        on PostgreSQL).

        A queued run is taken out of the queue and recorded failed with reason
        ``cancelled``, its token reservation given back (it used nothing). A run running
        in this process is stopped here and settled like any cancelled run (charged what
        its completed model responses used). A run held by another process is marked on
        its queue entry; that process notices within about a second
        (:meth:`watch_tenants`) and stops it the same way. This waits up to 5 s for that.

        Returns:
            ``(run, settled)``: the run as it is now, and whether it is settled (False: the
            process running it has not stopped it yet; its status turns ``failed`` then).

        Raises:
            NotFound: no such run of this tenant (another tenant's run alike).
            RunFinished: the run had already finished.
        """
        tid, calls = ctx.tenant_id, self.calls
        store = self._backend.tenant_store(ctx)
        run = await calls.call(tid, store.get_run, run_id)
        if run["status"] not in ("queued", "running"):
            raise RunFinished(f"run {run_id!r} already finished ({run['status']})", status=run["status"])
        audit: dict[str, Any] = {"actor": ctx.principal, "action": "run.cancel", "target": run_id}
        if run["status"] == "queued" and await calls.finish(tid, self._cancel_queued, ctx, store, run, audit):
            return await calls.call(tid, store.get_run, run_id), True
        task = self.inflight.task_of(tid, run_id)
        if task is not None:
            await self.inflight.stop([task], CANCELLED_BY_REQUEST)
        elif not await calls.call(tid, self.queue.request_cancel, tid, run_id):
            run = await calls.call(tid, store.get_run, run_id)  # it left the queue: finished, or claimed
            if run["status"] in ("queued", "running"):
                if _again:  # claimed between the two reads: once more, as a running run
                    return await self.cancel(ctx, run_id, _again=False)
                return run, False  # no queue entry holds it: no process to stop it in
            raise RunFinished(f"run {run_id!r} already finished ({run['status']})", status=run["status"])
        else:
            deadline = time.monotonic() + _REMOTE_CANCEL_WAIT_S
            while (await calls.call(tid, store.get_run, run_id))["status"] == "running":
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)

        def audited() -> tuple[RunRecord, bool]:
            run = store.get_run(run_id)
            settled = run["status"] not in ("queued", "running")
            store.append_audit(**audit, outcome="ok", detail={"was": "running", "settled": settled})
            return run, settled

        return await calls.finish(tid, audited)

    def _cancel_queued(
        self, ctx: TenantContext, store: TenantStore, run: RunRecord, audit: dict[str, Any]
    ) -> bool:
        """Take ``run`` out of the queue unclaimed and record it cancelled (audited), its
        reservation given back; in one transaction where the tenant's rows share the control
        plane's database. Returns False when a worker claimed it first (it runs: cancel it
        there)."""
        values, _ = cancelled_values(0.0, run["model"])
        reason, message = CANCELLED_BY_REQUEST
        values["error"] = {"code": "run_failed", "reason": reason, "message": message}
        write = store.prepare_settlement(
            run["id"], values, usage=None, audit=finish_audit(ctx, run, "error", values)
        )
        joined = self._settlement.joins(store)
        with self._backend.control_tx() as conn:
            entry = self.queue.cancel_queued(ctx.tenant_id, run["id"], conn=conn)
            if entry is None:
                return False
            self._budget.settle_tokens(ctx.tenant_id, entry.quota_period, entry.reserved_tokens, 0, conn=conn)
            if joined:
                store.apply(write, conn=conn)
                self._settlement.emit(store, run, values, conn)
        if not joined:
            store.apply(write)
            self._settlement.emit(store, run, values, None)
        store.append_audit(**audit, outcome="ok", detail={"was": "queued"})
        return True

    async def _cancel_requested(self) -> None:
        """Cancel the runs in flight here whose tenant asked another process to cancel
        them (:meth:`FairRunQueue.request_cancel`), and wait until each is settled."""
        mine = self.inflight.runs()
        if not mine:
            return
        wanted = await asyncio.to_thread(self.queue.cancel_requested, mine)
        await self.inflight.stop(
            [
                t
                for tenant_id, run_id in mine
                if run_id in wanted and (t := self.inflight.task_of(tenant_id, run_id))
            ],
            CANCELLED_BY_REQUEST,
        )

    async def watch_tenants(self, interval_s: float = 1.0) -> None:
        """Stop, in this process, the runs of tenants another process suspended or began
        deleting, and those still executing at a level their tenant has left (see
        :meth:`stop_stale`); lift the fence of resumed and deleted ones. Runs until
        cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._cancel_requested()
            except PatinoxError as err:
                log.warning("reading cancel requests failed", error=err.code)
            for tenant_id in self.inflight.tenants() + list(self._admit.fenced):
                try:
                    row = self._backend.get_tenant(tenant_id, include_deleted=True)
                    state, level = row["state"], row["isolation_level"]
                except NotFound:
                    state, level = "deleted", ""
                if state == "active":
                    self._admit.fenced.discard(tenant_id)
                    if self.inflight.stale(tenant_id, level):
                        # Another process changed its level: stop the runs at the old one,
                        # then the old level's executor here lets the tenant go.
                        await self.stop_stale(tenant_id, level)
                        listener = getattr(self._executor, "on_tenant_event", None)
                        if listener is not None:
                            await asyncio.to_thread(listener, tenant_id, TenantEvent.UPDATED)
                elif self.inflight.holds(tenant_id):
                    await self.stop_tenant(tenant_id)
                elif state == "deleted":
                    self._admit.fenced.discard(tenant_id)  # never resumed: nothing left to watch

    def on_tenant_event(self, tenant_id: str, event: TenantEvent) -> None:
        """Tenant-manager listener: stop runs on suspend/delete, lift the fence on resume
        and once a deletion is done.

        Called from any thread. On ``deleting`` it also waits (at most 30 s) until no
        process holds a run of the tenant any more (others notice within a second, see
        :meth:`watch_tenants`), so deletion purges only after every run stopped.
        """
        if event in (TenantEvent.RESUMED, TenantEvent.DELETED):
            # A deleted tenant is never resumed (ids are never reused): its fence would only
            # cost the tenant watch a read every second for the rest of the process's life.
            self._admit.fenced.discard(tenant_id)
            return
        if event == TenantEvent.UPDATED:
            # A change of isolation level: runs still at the old level stop here, before
            # the old level's executor lets the tenant go (its listener comes after this).
            if self.inflight.holds(tenant_id):
                level = self._backend.get_tenant(tenant_id)["isolation_level"]
                if self.inflight.stale(tenant_id, level):
                    self.inflight.on_loop(self.stop_stale(tenant_id, level))
            return
        if event not in (TenantEvent.SUSPENDED, TenantEvent.DELETING):
            return
        self._admit.fenced.add(tenant_id)
        if self.inflight.on_loop(self.stop_tenant(tenant_id)):
            return  # on the loop itself: scheduled, not waited for
        if event == TenantEvent.DELETING:
            deadline = time.monotonic() + 30
            while self.queue.held(tenant_id) and time.monotonic() < deadline:
                time.sleep(0.05)

    def reap_expired(self, now: datetime | None = None) -> int:
        """Requeue runs of dead workers and settle the synchronous runs whose process died
        (their hold expired at ``now``, UTC, default the present); see
        :meth:`Settlement.reap_expired`. Returns how many runs were affected."""
        return self._settlement.reap_expired(now)

    def on_limits_changed(self, tenant_id: str, event: TenantEvent) -> None:
        """Tenant-manager listener: queued runs take the tenant's new cap and priority."""
        if event != TenantEvent.UPDATED:
            return
        tenant = self._backend.get_tenant(tenant_id)
        limits = effective_limits(tenant["plan"], tenant["limit_overrides"])
        self.queue.retune(
            tenant_id, max_running=limits.max_concurrent_runs, priority=get_plan(tenant["plan"]).priority
        )

    def set_wakeup(self, event: asyncio.Event) -> None:
        """The event an in-process worker waits on; set when a run is queued here."""
        self._wakeup = event

    async def _execute(
        self,
        ctx: TenantContext,
        store: TenantStore,
        agent: AgentRecord,
        run: RunRecord,
        prompt: str,
        output_tokens: int | None,
        limits: RunLimits,
        ticket: Ticket,
        conversation: Conversation | None = None,
    ) -> RunRecord:
        """Run, then settle (:meth:`Settlement.settle`); the ticket is released whatever
        happens.

        A queued run's attempt (``ticket.attempt``) records its usage as it goes (see
        :class:`~patinox.control.settlement.Attempt`) and ends with the run; its usage
        record is that attempt's. A run with a streamed ``conversation`` (``namespace`` level,
        checked at :meth:`start`) is the agent's own run here, in the tenant's scope the
        request entered, as the ``namespace`` executor runs it; a conversation's turns
        without a stream go to the executor of the tenant's level.
        """
        definition = AgentDefinition(
            name=agent["name"],
            instructions=agent["instructions"],
            model=agent["model"],
            tools=tuple(agent["tools"]),
        )
        settlement, calls, tid = self._settlement, self.calls, ctx.tenant_id
        attempt = ticket.attempt

        async def settle(
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
            await calls.finish(
                tid, settlement.settle, ticket, ctx, store, run, values, usage, used=used, outcome=outcome
            )

        started = time.perf_counter()
        so_far = RunUsage()  # the run's usage as it goes: what a cancelled run is charged
        try:
            try:
                # A queued run checks the allow-list again (it may have changed while it
                # waited), then takes the tenant's own provider key, if any (BYOK), here on
                # the host: the model is resolved here or on the host end of the channel.
                check_model_allowed(definition.model, ctx.limits, tenant_id=tid)
                if provider_key_name(definition.model) is not None:  # no storage call otherwise
                    key = await calls.call(
                        tid, self._secrets.provider_key, store, definition.model, actor=run["principal"]
                    )
                    if key is not None:
                        definition = dataclasses.replace(definition, provider_key=key)
                # Again here: a queued run's tenant may have lost the tool since it was queued.
                check_tools_allowed(definition.tools, ctx.limits.allowed_tools)
                if conversation is None or conversation.on_event is None:
                    # Earlier turns go to the executor of the tenant's level (given only
                    # when there are some: an executor of an earlier shape runs the rest).
                    turns = {"history": conversation.history} if conversation and conversation.history else {}
                    outcome = await self._executor.execute(
                        ctx,
                        definition,
                        prompt,
                        output_tokens=output_tokens,
                        limits=limits,
                        memory=store,
                        usage=so_far,
                        on_usage=None if attempt is None else attempt.record,
                        **turns,
                    )
                else:
                    if conversation.on_event is not None:
                        conversation.on_event(RunEvent(kind="started", run_id=run["id"]))
                    outcome = await run_agent(
                        definition,
                        prompt,
                        output_tokens=output_tokens,
                        limits=limits,
                        memory=store,
                        usage=so_far,
                        conversation=conversation,
                        fetch=None if self._fetcher is None else self._fetcher(ctx),
                    )
            except PatinoxError as err:
                failed = err if isinstance(err, RunFailed) else RunFailed(err.message, reason=err.code)
                values, usage = self._failure(failed, started)
                used = (usage or {}).get("input_tokens", 0) + (usage or {}).get("output_tokens", 0)
                await settle(ticket, ctx, store, run, values, usage, used=used, outcome="error")
                if run["mode"] == "sync":
                    raise RunFailed(failed.message, **{**failed.fields, "run_id": run["id"]}) from err
                return {**run, **values}
            except asyncio.CancelledError:
                # Charged what its completed model responses used (a response still in
                # flight is not counted, as for a failed run).
                used = so_far.input_tokens + so_far.output_tokens
                values, usage = cancelled_values(
                    (time.perf_counter() - started) * 1000, definition.model, so_far
                )
                if (stop_reason := stop_reason_of_current_task()) is not None:
                    reason, message = stop_reason
                    values["error"] = {"code": "run_failed", "reason": reason, "message": message}
                await settle(ticket, ctx, store, run, values, usage, used=used, outcome="error")
                raise
            values = {
                "status": "succeeded",
                "output": outcome.output,
                "finished_at": utcnow(),
                "input_tokens": outcome.input_tokens,
                "output_tokens": outcome.output_tokens,
                "tool_calls": outcome.tool_calls,
                "duration_ms": outcome.duration_ms,
            }
            usage = usage_record(
                outcome.model,
                outcome.simulated,
                outcome.input_tokens,
                outcome.output_tokens,
                outcome.tool_calls,
                outcome.duration_ms,
                cpu_seconds=outcome.cpu_seconds,
                peak_memory_bytes=outcome.peak_memory_bytes,
            )
            used = outcome.input_tokens + outcome.output_tokens
            await settle(ticket, ctx, store, run, values, usage, used=used, outcome="ok")
            return {**run, **values}
        finally:
            if not ticket.called:  # ended before its settlement: it used nothing known
                await calls.finish(tid, settlement.release, ticket, 0)

    @staticmethod
    def _failure(err: RunFailed, started: float) -> tuple[RunRecord, UsageRecord | None]:
        return failed_values(
            (time.perf_counter() - started) * 1000,
            {"code": err.code, "reason": err.reason, "message": err.message},
            model=err.model,
            simulated=bool(err.simulated),
            input_tokens=int(err.input_tokens),
            output_tokens=int(err.output_tokens),
            tool_calls=int(err.tool_calls),
            cpu_seconds=err.fields.get("cpu_seconds"),
            peak_memory_bytes=err.fields.get("peak_memory_bytes"),
        )

    async def shutdown(self) -> None:
        """Cancel runs in flight (each is recorded as failed) and wait for them; then close
        the executor when it holds resources (execution processes)."""
        await self.inflight.stop_all()
        if isinstance(self._executor, ClosableExecutor):
            await self._executor.aclose()
