"""The path of one run: admission, execution by the tenant's executor, settlement.

1. Admission — the agent is loaded through the tenant's store (a foreign id is simply not
   found), the request is validated, a concurrent-run slot is held (a claimed row of the
   shared run queue, so the cap holds across processes) and the run's worst-case tokens
   are reserved against the daily budget. Refusals end here, before any model call.
2. Execution — the executor for the tenant's isolation level runs the agent with the
   tenant context passed explicitly.
3. Settlement — in one transaction the run's result, its usage record and its audit record
   are written; the reservation is settled to actual usage and the slot released.

Asynchronous runs (``mode="async"``) have their tokens reserved, are written to the
durable fair queue and answered at once; a worker (in this process or another) claims
and executes them later, and settles their reservation. A restart loses none; a run
whose worker died is executed again by another (at-least-once execution): each execution
is an attempt, recorded on the run and charged what it used (see :class:`_Attempt` and
:meth:`RunService.reap_expired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field
from pydantic_ai.usage import RunUsage
from sqlalchemy import Connection

from patinox.agents import (
    AgentDefinition,
    MemoryStore,
    RunLimits,
    RunOutcome,
    count_simulated_tokens,
    is_simulated,
    validate_model_id,
    validate_tool_names,
)
from patinox.errors import InvalidRequest, NotFound, PatinoxError, RunFailed, TenantSuspended
from patinox.limits import RUNS_PER_DAY, Claim, FairRunQueue, FairShareAdmission, TokenBudget, worker_id
from patinox.storage import PreparedWrite, SqlBackend, TenantStore, utcnow
from patinox.tenancy import (
    TenantContext,
    effective_limits,
    get_plan,
    new_id,
)

Row = dict[str, Any]

log = structlog.get_logger("patinox.runs")


class Release(Protocol):
    """Settles a run's tokens to ``used`` and frees its slot, in ``conn`` when given."""

    def __call__(self, used: int, conn: Connection | None = None, /) -> None: ...


class _Once:
    """A run's :class:`Release`, noting whether it was called: a run's task cancelled before
    its first step runs none of :meth:`RunService._execute`, whose ``finally`` would call it.
    """

    def __init__(self, release: Release) -> None:
        self._release = release
        self.called = False

    def __call__(self, used: int, conn: Connection | None = None, /) -> None:
        self.called = True
        self._release(used, conn)


class _RunTask(asyncio.Task[Row]):
    """A run's task, whose ``repr`` is its name and state instead of asyncio's default,
    which formats the coroutine and every done callback with its source file and line.
    anyio puts the repr of the current task into the reason of every cancel scope it
    cancels, and the agent loop cancels several a run: the default repr cost a run about
    as much as one of its SQLite writes."""

    def __repr__(self) -> str:
        return f"<RunTask {self.get_name()!r} {'done' if self.done() else 'pending'}>"


def _outcome(values: Row) -> str:
    """How an attempt ended (``succeeded``, ``failed``, ``cancelled``), from the settlement
    values of its run."""
    if values["status"] == "succeeded":
        return "succeeded"
    return "cancelled" if (values.get("error") or {}).get("reason") == "cancelled" else "failed"


class _Attempt:
    """One execution of a queued run by a worker: its number, and its usage kept where it
    outlives the worker.

    After each step of the agent loop (:meth:`record`: after each model response, before
    acting on it) the attempt's usage is written on the run's queue entry
    (:meth:`FairRunQueue.record_usage`) while the entry is still this worker's claim. If
    the worker dies, the reaper puts the run back and charges that usage
    (:meth:`RunService.reap_expired`): at most the model response in hand when the worker
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

    def ended(self, values: Row) -> Row:
        """The attempt's end, from its run's settlement ``values`` (see
        :meth:`TenantStore.prepare_settlement`)."""
        return {
            "attempt": self.number,
            "outcome": _outcome(values),
            "ended_at": values["finished_at"],
            "input_tokens": values.get("input_tokens", 0),
            "output_tokens": values.get("output_tokens", 0),
            "tool_calls": values.get("tool_calls", 0),
        }


class RunExecutor(Protocol):
    """Runs one agent for one tenant at that tenant's isolation level.

    ``execute`` returns the awaitable of the run (an ``async def`` method qualifies); it may
    raise at once, before the run starts, or when awaited. The run adds its usage to
    ``usage`` as it goes (see :func:`patinox.agents.run_agent`), so a cancelled run's
    tokens so far can be charged, and calls ``on_usage(usage)`` after each step of the
    agent loop (each model response, before acting on it), so that a worker can record
    them where they outlive its process.
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
    ) -> Awaitable[RunOutcome]: ...


def _usage_record(
    model: str, simulated: bool, input_tokens: int, output_tokens: int, tool_calls: int, duration_ms: float
) -> Row:
    """A run's usage record (the ``usage`` row its settlement writes); tokens, milliseconds."""
    return {
        "model": model,
        "simulated": int(simulated),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tool_calls": tool_calls,
        "duration_ms": duration_ms,
    }


def _failed(
    duration_ms: float,
    error: Row,
    *,
    model: str,
    simulated: bool,
    input_tokens: int = 0,
    output_tokens: int = 0,
    tool_calls: int = 0,
) -> tuple[Row, Row | None]:
    """The settlement values of a failed run of ``model`` that ran ``duration_ms``
    milliseconds, with ``error`` (``code``, ``reason``, ``message``), and its usage record:
    ``None`` when it used no tokens (nothing to meter)."""
    values = {
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
    return values, _usage_record(model, simulated, input_tokens, output_tokens, tool_calls, duration_ms)


_CANCELLED = {
    "code": "run_failed",
    "reason": "cancelled",
    "message": "the run was cancelled: the server stopped, or its tenant was suspended or deleted",
}


def _cancelled(duration_ms: float, model: str, usage: RunUsage | None = None) -> tuple[Row, Row | None]:
    """:func:`_failed` for a run of ``model`` cancelled after ``duration_ms`` milliseconds,
    having used ``usage`` (nothing when ``None``)."""
    usage = usage or RunUsage()
    return _failed(
        duration_ms,
        dict(_CANCELLED),
        model=model,
        simulated=is_simulated(model),
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        tool_calls=usage.tool_calls,
    )


class AgentSpec(BaseModel):
    """An agent definition as a tenant writes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    instructions: str = Field(default="", max_length=20_000)
    model: str = Field(default="simulated", max_length=200)
    tools: list[str] = Field(default_factory=list, max_length=32)
    max_output_tokens: int | None = Field(default=None, ge=1, le=10**7, description="per-run cap, tokens")
    max_tool_calls: int | None = Field(default=None, ge=0, le=10**4, description="per-run cap")


class AgentPatch(BaseModel):
    """A partial update of an agent; omitted fields stay."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
    )
    instructions: str | None = Field(default=None, max_length=20_000)
    model: str | None = Field(default=None, max_length=200)
    tools: list[str] | None = Field(default=None, max_length=32)
    max_output_tokens: int | None = Field(default=None, ge=1, le=10**7)
    max_tool_calls: int | None = Field(default=None, ge=0, le=10**4)


class RunRequest(BaseModel):
    """A run as a tenant asks for it."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(min_length=1, max_length=1_000_000, description="the user prompt")
    output_tokens: int | None = Field(
        default=None, ge=1, strict=True, description="output tokens to ask the model for (simulated: exact)"
    )
    mode: Literal["sync", "async"] = "sync"


#: Seconds a synchronous run's concurrency hold outlives the run's timeout (settlement).
_HOLD_GRACE_S = 60.0
#: Longest lease of a synchronous run's hold, seconds: the longest run timeout an override
#: may set (30 days, :class:`~patinox.tenancy.LimitOverrides`) plus the settlement grace.
_HOLD_MAX_S = 30 * 86_400.0 + _HOLD_GRACE_S

#: Tokens allowed per tool call for the call itself and its result in the admission estimate.
TOOL_CALL_TOKENS = 64


def worst_case_tokens(agent: Row, prompt: str, output_tokens: int | None, limits: RunLimits) -> int:
    """The tokens reserved for a run before it starts, and its hard cap while it runs.

    Every model request of a run re-sends the conversation, so a run that may make ``n``
    tool calls sends the prompt (instructions + input) up to ``n + 1`` times, plus the tool
    calls and results (:data:`TOOL_CALL_TOKENS` each), plus its output. Words are counted
    with the simulated tokenizer (:func:`patinox.agents.count_simulated_tokens`); for real
    providers it is an estimate, and the cap stops a run that goes past it.
    """
    words = count_simulated_tokens(agent["instructions"]) + count_simulated_tokens(prompt)
    calls = limits.max_tool_calls if agent["tools"] else 0
    output = output_tokens or limits.max_output_tokens
    return (calls + 1) * words + calls * TOOL_CALL_TOKENS + output


class AgentService:
    """Tenant-scoped agent CRUD with validation of models and tools."""

    def __init__(self, backend: SqlBackend) -> None:
        self._backend = backend

    def create(self, ctx: TenantContext, spec: AgentSpec) -> Row:
        """Create an agent. Raises UnknownModel, UnknownTool, InvalidRequest, AlreadyExists."""
        self._validate(ctx, spec.model, spec.tools, spec.max_output_tokens)
        store = self._backend.tenant_store(ctx)
        row = store.create_agent(spec.model_dump())
        store.append_audit(
            actor=ctx.principal,
            action="agent.create",
            target=row["id"],
            outcome="ok",
            detail={"name": spec.name, "model": spec.model},
        )
        return row

    def update(self, ctx: TenantContext, agent_id: str, patch: AgentPatch) -> Row:
        """Update an agent. Raises NotFound, UnknownModel, UnknownTool, InvalidRequest."""
        store = self._backend.tenant_store(ctx)
        values = patch.model_dump(exclude_unset=True)
        if not values:
            raise InvalidRequest("nothing to update")
        cleared = [k for k in ("name", "instructions", "model", "tools") if k in values and values[k] is None]
        if cleared:
            raise InvalidRequest(f"{', '.join(cleared)} cannot be null", field=cleared[0])
        merged: Row = {**store.get_agent(agent_id), **values}
        self._validate(ctx, merged["model"], merged["tools"], merged["max_output_tokens"])
        row = store.update_agent(agent_id, values)
        store.append_audit(
            actor=ctx.principal,
            action="agent.update",
            target=agent_id,
            outcome="ok",
            detail={"fields": sorted(values)},
        )
        return row

    def delete(self, ctx: TenantContext, agent_id: str) -> None:
        """Delete an agent and its runs. Raises NotFound."""
        store = self._backend.tenant_store(ctx)
        store.delete_agent(agent_id)
        store.append_audit(
            actor=ctx.principal, action="agent.delete", target=agent_id, outcome="ok", detail={}
        )

    @staticmethod
    def _validate(ctx: TenantContext, model: str, tools: list[str], max_out: int | None) -> None:
        validate_model_id(model)
        validate_tool_names(tools)
        if max_out is not None and max_out > ctx.limits.max_output_tokens_per_run:
            raise InvalidRequest(
                f"max_output_tokens {max_out} is above the plan's {ctx.limits.max_output_tokens_per_run}",
                field="max_output_tokens",
            )


class RunService:
    """Admits, executes and settles runs. One per process (API server or worker).

    Synchronous runs execute in the admitting process; asynchronous runs are written to
    the durable fair queue (:class:`~patinox.limits.FairRunQueue`) and executed by
    whichever worker claims them (:class:`RunWorker`, in the API process or in
    ``patinox worker`` processes). Both count against the tenant's concurrent-run cap
    through the same queue table, so the cap holds across every process.
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
    ) -> None:
        self._backend = backend
        self._executor = executor
        self.queue = queue
        self._budget = budget
        #: This process's fair share of its own capacity; ``None`` admits every run at once.
        self.admission = admission
        self.holder = holder or worker_id("api")
        self._tasks: dict[str, set[asyncio.Task[Row]]] = {}
        self._fenced: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    async def start(self, ctx: TenantContext, agent_id: str, req: RunRequest) -> Row:
        """Admit a run; for ``sync`` wait for and return the finished run, for ``async``
        queue it and return the queued run at once.

        Raises:
            NotFound: no such agent for this tenant.
            InvalidRequest: output_tokens above the agent's or plan's cap.
            ConcurrencyLimited, QuotaExceeded: admission refused; nothing was run or stored.
            Overloaded: a synchronous run's turn in this process's fair share did not come
                in time; nothing was run or stored.
            ExceedsBudget: the run's worst case is more than the whole daily token budget
                (no day admits it); nothing was run, stored or counted.
            RunFailed: a synchronous run failed (the run is recorded with its error).
        """
        if ctx.tenant_id in self._fenced:
            raise TenantSuspended("this tenant is suspended", tenant_id=ctx.tenant_id)
        store = self._backend.tenant_store(ctx)
        agent = store.get_agent(agent_id)
        limits = self._run_limits(ctx, agent)
        if req.output_tokens is not None and req.output_tokens > limits.max_output_tokens:
            raise InvalidRequest(
                f"output_tokens {req.output_tokens} is above this agent's limit of "
                f"{limits.max_output_tokens}",
                field="output_tokens",
            )
        worst_case = worst_case_tokens(agent, req.input, req.output_tokens, limits)
        limits = dataclasses.replace(limits, max_total_tokens=worst_case)
        if req.mode == "async":
            return self._enqueue(ctx, store, agent, req, worst_case)
        return await self._run_now(ctx, store, agent, req, limits)

    @staticmethod
    def _new_run(
        ctx: TenantContext, store: TenantStore, agent: Row, req: RunRequest, run_id: str
    ) -> tuple[Row, PreparedWrite]:
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
        self, ctx: TenantContext, store: TenantStore, agent: Row, req: RunRequest, worst_case: int
    ) -> Row:
        plan = get_plan(ctx.plan)

        def queue_it(run: Row, period: str, conn: Connection | None = None) -> None:
            self.queue.enqueue(
                ctx.tenant_id,
                run["id"],
                weight=plan.weight,
                priority=plan.priority,
                max_running=ctx.limits.max_concurrent_runs,
                reserved_tokens=worst_case,
                quota_period=period,
                conn=conn,
            )

        run, insert_run = self._new_run(ctx, store, agent, req, new_id("run"))
        joined = store.joins(self._backend.engine)
        # Quotas, run and queue entry in one transaction when the run's row lives in the
        # shared database (pool); otherwise the run is written after, and if its queue
        # entry cannot be written the quotas are given back and the run removed (no worker
        # would ever take it).
        with self._backend.control_tx() as conn:
            day = self._budget.consume(ctx.tenant_id, RUNS_PER_DAY, 1, ctx.limits.runs_per_day, conn=conn)
            reservation = self._budget.reserve(
                ctx.tenant_id, worst_case, ctx.limits.tokens_per_day, conn=conn
            )
            if joined:
                store.apply(insert_run, conn=conn)
                queue_it(run, reservation.period, conn)
        if not joined:
            written = False
            try:
                store.apply(insert_run)
                written = True
                queue_it(run, reservation.period)
            except BaseException:
                with self._backend.control_tx() as conn:
                    self._budget.settle(reservation, 0, conn=conn)
                    self._budget.give_back(ctx.tenant_id, RUNS_PER_DAY, 1, day, conn=conn)
                if written:
                    with contextlib.suppress(PatinoxError):
                        store.discard_run(run["id"])
                raise
        if self._wakeup is not None:
            self._wakeup.set()
        return run

    async def _run_now(
        self, ctx: TenantContext, store: TenantStore, agent: Row, req: RunRequest, limits: RunLimits
    ) -> Row:
        admission = self.admission
        if admission is not None:
            # The process's fair share first: a run waiting for its turn holds no slot of
            # the tenant's cap and no tokens. The slot is freed when the run is answered (a
            # caller that went away: when its run was told to stop, a moment before the
            # run's own settlement ends).
            async with admission.slot(ctx.tenant_id, get_plan(ctx.plan).weight):
                if ctx.tenant_id in self._fenced:  # suspended while the run waited
                    raise TenantSuspended("this tenant is suspended", tenant_id=ctx.tenant_id)
                return await self._admitted_run(ctx, store, agent, req, limits)
        return await self._admitted_run(ctx, store, agent, req, limits)

    async def _admitted_run(
        self, ctx: TenantContext, store: TenantStore, agent: Row, req: RunRequest, limits: RunLimits
    ) -> Row:
        run_id = new_id("run")
        cap = ctx.limits.max_concurrent_runs
        run, insert_run = self._new_run(ctx, store, agent, req, run_id)
        joined = store.joins(self._backend.engine)
        # Slot, quotas and (pool tenants) the run row in one control-plane transaction:
        # all or nothing.
        with self._backend.control_tx() as conn:
            # The hold's lease outlives the run's timeout: an expired hold means "the API
            # process died", and the reaper would free the slot of a run still in flight.
            # Quotas before the hold, which keeps the reservation so that the reaper can
            # settle it if this process dies (and takes the ledger's and then the queue's
            # row locks in the order an asynchronous admission takes them).
            day = self._budget.consume(ctx.tenant_id, RUNS_PER_DAY, 1, ctx.limits.runs_per_day, conn=conn)
            reservation = self._budget.reserve(
                ctx.tenant_id, limits.max_total_tokens or 0, ctx.limits.tokens_per_day, conn=conn
            )
            lease = min(max(300.0, limits.timeout_s + _HOLD_GRACE_S), _HOLD_MAX_S)
            self.queue.hold(
                ctx.tenant_id,
                run_id,
                max_running=cap,
                holder=self.holder,
                lease_s=lease,
                reserved_tokens=reservation.tokens,
                quota_period=reservation.period,
                conn=conn,
            )
            if joined:
                store.apply(insert_run, conn=conn)

        def done(used: int, conn: Connection | None = None) -> None:
            # By the numbers, not Reservation.settle(): that marks the reservation settled
            # before the transaction commits, and a settlement whose joined transaction
            # rolled back would then be skipped by the fallback (tokens held all day).
            with self._backend.control_tx(conn) as conn:
                self._budget.settle_tokens(
                    reservation.tenant_id, reservation.period, reservation.tokens, used, conn=conn
                )
                self.queue.release(ctx.tenant_id, run_id, conn=conn)

        if not joined:
            try:
                store.apply(insert_run)
            except BaseException:
                with self._backend.control_tx() as conn:
                    done(0, conn)
                    self._budget.give_back(ctx.tenant_id, RUNS_PER_DAY, 1, day, conn=conn)
                raise

        # From admission to here nothing awaited, so a tenant fenced by stop_tenant() after
        # this point finds this run among its tasks.
        release = _Once(done)
        task = self._track(
            ctx.tenant_id,
            self._execute(
                ctx,
                store,
                agent,
                run,
                req.input,
                req.output_tokens,
                limits,
                release,
                period=reservation.period,
            ),
            if_unstarted=self._unstarted_settlement(ctx, store, run, release),
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                task.cancel()  # the caller went away: stop its run too
                raise
            if (current := asyncio.current_task()) and current.cancelling():
                raise
            raise RunFailed(
                "the run was stopped because its tenant was suspended or deleted",
                reason="tenant_stopped",
                run_id=run_id,
            ) from None

    async def execute_claim(self, claim: Claim) -> Row | None:
        """Run a queued run a worker claimed; settle its tokens and release it.

        Returns the finished run, or ``None`` when the run or its tenant is gone (the
        queue entry is dropped and its reservation returned) or the tenant is no longer
        active (the run is put back in the queue, unstarted, with its reservation).
        """

        attempt: _Attempt | None = None

        def done(used: int, conn: Connection | None = None) -> None:
            with self._backend.control_tx(conn) as conn:
                # Only the worker still holding the claim gives its reservation back: after
                # an expired lease the run was put back with the reservation, and whoever
                # claims it next settles it. Tokens this execution used are spent either way,
                # less those the reaper charged when it put the run back.
                ours = self.queue.release(claim.tenant_id, claim.run_id, holder=claim.holder, conn=conn)
                spend = used if attempt is None else attempt.unspent(used, ours)
                self._budget.settle_tokens(
                    claim.tenant_id,
                    claim.quota_period,
                    claim.reserved_tokens if ours else 0,
                    spend,
                    conn=conn,
                )

        try:
            tenant = self._backend.get_tenant(claim.tenant_id)
            store = self._backend.acting_on(claim.tenant_id)
            run = store.get_run(claim.run_id)
            agent = store.get_agent(run["agent_id"])
        except NotFound:
            done(0)
            return None
        if run["status"] not in ("queued", "running"):
            done(0)  # finished by a worker that died before releasing it
            return run
        if tenant["state"] != "active":
            # Suspended (or being deleted) since the claim: the run waits, queued, for the
            # tenant's resumption (a deletion purges it).
            self.queue.put_back(claim)
            return None
        principal = str(run["principal"])
        if principal.startswith("key_") and not self._backend.key_may(principal, tenant["id"], "runs:write"):
            # The API key that queued the run was revoked (or lost the scope) meanwhile;
            # runs queued by an operator (the CLI) carry no key.
            values = {
                "status": "failed",
                "finished_at": utcnow(),
                "error": {
                    "code": "run_failed",
                    "reason": "key_revoked",
                    "message": "the key that queued this run was revoked",
                },
            }
            store.update_run(run["id"], values)
            done(0)
            return {**run, **values}
        ctx = TenantContext.for_tenant(tenant, principal=run["principal"], scopes={"runs:write"})
        store = self._backend.tenant_store(ctx)  # with the tenant's quotas (memory_bytes)
        limits = dataclasses.replace(self._run_limits(ctx, agent), max_total_tokens=claim.reserved_tokens)
        attempt = _Attempt(
            claim,
            store.start_attempt(run["id"], holder=claim.holder),
            backend=self._backend,
            queue=self.queue,
            budget=self._budget,
        )
        release = _Once(done)
        task = self._track(
            ctx.tenant_id,
            self._execute(
                ctx,
                store,
                agent,
                run,
                run["input"],
                run["requested_output_tokens"],
                limits,
                release,
                period=claim.quota_period,
                attempt=attempt,
            ),
            if_unstarted=self._unstarted_settlement(ctx, store, run, release, attempt=attempt),
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                task.cancel()
                raise
            return None

    def _unstarted_settlement(
        self,
        ctx: TenantContext,
        store: TenantStore,
        run: Row,
        done: _Once,
        *,
        attempt: _Attempt | None = None,
    ) -> Callable[[], None]:
        """What to do when a run's task was cancelled: if it was cancelled before its first
        step (a tenant stopped, or the server shutting down, in the loop iteration after the
        run was admitted) and so never called ``done``, record its run failed as cancelled
        and give back its slot and reservation: it used nothing.

        Without this the slot and the worst-case tokens stay held until the hold's lease
        expires, and the reaper then charges the whole reservation.
        """

        def check() -> None:
            if done.called:
                return
            values, _ = _cancelled(0.0, run["model"])
            write = store.prepare_settlement(
                run["id"],
                values,
                usage=None,
                audit=self._audit(ctx, run, "error", values),
                attempt=None if attempt is None else attempt.ended(values),
            )
            try:
                if store.joins(self._backend.engine):
                    with self._backend.control_tx() as conn:
                        store.apply(write, conn=conn)
                        done(0, conn)
                    return
                with contextlib.suppress(PatinoxError):  # the run row only; its tokens are free
                    store.apply(write)
                done(0)
            except PatinoxError:
                pass  # the hold's lease expires and the reaper settles the run

        return check

    def _track(
        self, tenant_id: str, job: Coroutine[Any, Any, Row], *, if_unstarted: Callable[[], None]
    ) -> asyncio.Task[Row]:
        """``job`` as a task among ``tenant_id``'s runs in flight (:meth:`stop_tenant`
        cancels them); ``if_unstarted`` is called if the task ends cancelled (one done
        callback does both: every run's task has it, and each callback costs the run)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        task: asyncio.Task[Row] = _RunTask(job, loop=loop, name=f"run of {tenant_id}")
        tasks = self._tasks.setdefault(tenant_id, set())
        tasks.add(task)

        def done(t: asyncio.Task[Row]) -> None:
            tasks.discard(t)
            if not tasks and self._tasks.get(tenant_id) is tasks:
                del self._tasks[tenant_id]
            if t.cancelled():
                if_unstarted()
            else:
                t.exception()  # retrieved: a failed run is recorded, not re-raised here

        task.add_done_callback(done)
        return task

    async def stop_tenant(self, tenant_id: str) -> int:
        """Fence the tenant (no new run starts in this process) and cancel its runs in
        flight here, waiting until each is recorded as failed. Returns how many."""
        self._fenced.add(tenant_id)
        tasks = list(self._tasks.get(tenant_id, ()))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def watch_tenants(self, interval_s: float = 1.0) -> None:
        """Stop, in this process, the runs of tenants another process suspended or began
        deleting; lift the fence of resumed and deleted ones. Runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            for tenant_id in list(self._tasks) + list(self._fenced):
                try:
                    state = self._backend.get_tenant(tenant_id, include_deleted=True)["state"]
                except NotFound:
                    state = "deleted"
                if state == "active":
                    self._fenced.discard(tenant_id)
                elif tenant_id in self._tasks:
                    await self.stop_tenant(tenant_id)
                elif state == "deleted":
                    self._fenced.discard(tenant_id)  # never resumed: nothing left to watch

    def on_tenant_event(self, tenant_id: str, event: str) -> None:
        """Tenant-manager listener: stop runs on suspend/delete, lift the fence on resume
        and once a deletion is done.

        Called from any thread. On ``deleting`` it also waits (at most 30 s) until no
        process holds a run of the tenant any more (others notice within a second, see
        :meth:`watch_tenants`), so deletion purges only after every run stopped.
        """
        if event in ("resumed", "deleted"):
            # A deleted tenant is never resumed (ids are never reused): its fence would only
            # cost the tenant watch a read every second for the rest of the process's life.
            self._fenced.discard(tenant_id)
            return
        if event not in ("suspended", "deleting"):
            return
        self._fenced.add(tenant_id)
        loop = self._loop
        try:
            on_loop = loop is not None and asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is not None and loop.is_running():
            if on_loop:
                loop.create_task(self.stop_tenant(tenant_id))
                return
            asyncio.run_coroutine_threadsafe(self.stop_tenant(tenant_id), loop).result(timeout=30)
        if event == "deleting":
            deadline = time.monotonic() + 30
            while self.queue.held(tenant_id) and time.monotonic() < deadline:
                time.sleep(0.05)

    def reap_expired(self, now: datetime | None = None) -> int:
        """Requeue runs of dead workers; settle the synchronous runs whose API process died
        (their hold expired at ``now``, UTC, default the present). Returns how many runs
        were affected.

        A run put back keeps its reservation (its next attempt settles it); the tokens its
        dead worker's attempt had recorded (:class:`_Attempt`) are spent in the ledger in
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

        back, holds = self.queue.requeue_expired(now, on_requeue=charge)
        for claim in requeued:
            self._record_requeue(claim)
        for hold in holds:
            try:
                store = self._backend.acting_on(hold.tenant_id)
                finished = store.get_run(hold.run_id)["status"] in ("succeeded", "failed")
            except NotFound:
                store, finished = None, False
            if store is not None and not finished:
                values = {
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

    def on_limits_changed(self, tenant_id: str, event: str) -> None:
        """Tenant-manager listener: queued runs take the tenant's new cap and priority."""
        if event != "updated":
            return
        tenant = self._backend.get_tenant(tenant_id)
        limits = effective_limits(tenant["plan"], tenant["limit_overrides"])
        self.queue.retune(
            tenant_id, max_running=limits.max_concurrent_runs, priority=get_plan(tenant["plan"]).priority
        )

    def set_wakeup(self, event: asyncio.Event) -> None:
        """The event an in-process worker waits on; set when a run is queued here."""
        self._wakeup = event

    def _run_limits(self, ctx: TenantContext, agent: Row) -> RunLimits:
        lim = ctx.limits
        max_out = min(
            agent["max_output_tokens"] or lim.max_output_tokens_per_run,
            lim.max_output_tokens_per_run,
        )
        max_tools = min(
            agent["max_tool_calls"] if agent["max_tool_calls"] is not None else lim.max_tool_calls_per_run,
            lim.max_tool_calls_per_run,
        )
        if not agent["tools"]:
            # Admission reserves no tool calls for an agent without tools (worst_case_tokens):
            # a call the model asks for anyway must end the run, not be answered with a retry
            # request that re-sends the whole conversation past the reserved tokens.
            max_tools = 0
        return RunLimits(max_output_tokens=max_out, max_tool_calls=max_tools, timeout_s=lim.run_timeout_s)

    async def _execute(
        self,
        ctx: TenantContext,
        store: TenantStore,
        agent: Row,
        run: Row,
        prompt: str,
        output_tokens: int | None,
        limits: RunLimits,
        done: Release,
        *,
        period: str,
        attempt: _Attempt | None = None,
    ) -> Row:
        """Run, then settle in storage; ``done(tokens)`` runs last, whatever happens.

        The run's result, usage and audit records are written in one transaction; for pool
        tenants ``done`` (token settlement and slot release) joins it. Otherwise (bridge and
        silo tenants, or when that transaction fails) the tokens used are first spent in
        ``period`` of the shared ledger, then the run's records are written in the tenant's
        database, then ``done(0)`` frees the slot and gives the reservation back. A process
        dying between two of these commits leaves either a run still running, which is
        executed again and charged again (both executions used tokens), or a finished run
        whose tokens are already charged, which the next worker only releases: never a
        finished run whose tokens nobody charges. Neither the run's result nor the slot
        and reservation are lost or kept.

        A queued run's ``attempt`` records its usage as it goes (see :class:`_Attempt`)
        and ends with the run; its usage record is that attempt's.

        Args:
            period: the ledger period the run's tokens were reserved in.
            attempt: the worker's attempt, for a queued run (``None``: a synchronous run).
        """
        definition = AgentDefinition(
            name=agent["name"],
            instructions=agent["instructions"],
            model=agent["model"],
            tools=tuple(agent["tools"]),
        )
        started = time.perf_counter()
        so_far = RunUsage()  # the run's usage as it goes: what a cancelled run is charged
        used = 0
        charged = 0  # of ``used``, tokens already spent in the ledger (not by ``done``)
        released = False

        def settle(values: Row, usage: Row | None, outcome: str) -> None:
            nonlocal released, charged
            if usage is not None:
                usage = {**usage, "attempt": 1 if attempt is None else attempt.number}
            write = store.prepare_settlement(
                run["id"],
                values,
                usage=usage,
                audit=self._audit(ctx, run, outcome, values),
                attempt=None if attempt is None else attempt.ended(values),
            )
            if store.joins(self._backend.engine):
                try:
                    with self._backend.control_tx() as conn:
                        store.apply(write, conn=conn)
                        done(used, conn)
                except PatinoxError:
                    pass  # rolled back, the run's own records too: write them as below
                else:
                    released = True  # committed
                    return
            if used:
                with contextlib.suppress(PatinoxError):  # not charged here: done() charges them
                    if attempt is None:
                        self._budget.settle_tokens(ctx.tenant_id, period, 0, used)
                    else:
                        attempt.spend(used)
                    charged = used
            store.apply(write)

        try:
            try:
                outcome = await self._executor.execute(
                    ctx,
                    definition,
                    prompt,
                    output_tokens=output_tokens,
                    limits=limits,
                    memory=store,
                    usage=so_far,
                    on_usage=None if attempt is None else attempt.record,
                )
            except PatinoxError as err:
                failed = err if isinstance(err, RunFailed) else RunFailed(err.message, reason=err.code)
                values, usage = self._failure(failed, started)
                used = (usage or {}).get("input_tokens", 0) + (usage or {}).get("output_tokens", 0)
                settle(values, usage, "error")
                if run["mode"] == "sync":
                    raise RunFailed(failed.message, **{**failed.fields, "run_id": run["id"]}) from err
                return {**run, **values}
            except asyncio.CancelledError:
                # Charged what its completed model responses used (a response still in
                # flight is not counted, as for a failed run).
                used = so_far.input_tokens + so_far.output_tokens
                values, usage = _cancelled((time.perf_counter() - started) * 1000, definition.model, so_far)
                settle(values, usage, "error")
                raise
            used = outcome.input_tokens + outcome.output_tokens
            values = {
                "status": "succeeded",
                "output": outcome.output,
                "finished_at": utcnow(),
                "input_tokens": outcome.input_tokens,
                "output_tokens": outcome.output_tokens,
                "tool_calls": outcome.tool_calls,
                "duration_ms": outcome.duration_ms,
            }
            usage = _usage_record(
                outcome.model,
                outcome.simulated,
                outcome.input_tokens,
                outcome.output_tokens,
                outcome.tool_calls,
                outcome.duration_ms,
            )
            settle(values, usage, "ok")
            return {**run, **values}
        finally:
            if not released:
                done(used - charged)

    @staticmethod
    def _failure(err: RunFailed, started: float) -> tuple[Row, Row | None]:
        f = err.fields
        return _failed(
            (time.perf_counter() - started) * 1000,
            {"code": err.code, "reason": f.get("reason", "error"), "message": err.message},
            model=f.get("model", "unknown"),
            simulated=bool(f.get("simulated", False)),
            input_tokens=int(f.get("input_tokens", 0)),
            output_tokens=int(f.get("output_tokens", 0)),
            tool_calls=int(f.get("tool_calls", 0)),
        )

    @staticmethod
    def _audit(ctx: TenantContext, run: Row, outcome: str, values: Row) -> Row:
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

    async def shutdown(self) -> None:
        """Cancel runs in flight (each is recorded as failed) and wait for them."""
        tasks = [t for ts in self._tasks.values() for t in ts]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
