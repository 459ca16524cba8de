"""Admission: the checks a run passes before it may use a model, and what it holds after.

A run is admitted by one :class:`RunAdmission`, whichever way it comes; refusals end here,
before any model call, and leave nothing counted. In order:

1. the agent's run rate (``per_agent_rpm``, a moving window in the deployment's
   rate-limit store: ``rate_limited``, 429);
2. the tenant's state: a tenant suspended or being deleted is refused
   (``tenant_suspended``), also one this process fenced while its keys still worked, and
   a tenant moving between storage models (``tenant_moving``, 503), or changing
   isolation level (the same, for a run to execute now; an asynchronous run is queued);
3. the process's fair share of its own capacity
   (:class:`~patinox.limits.FairShareAdmission`; a synchronous run waits its turn, at
   most ``max_wait_s``, else ``overloaded``, 503);
4. the daily quotas: one run against ``runs_per_day`` and the run's worst-case tokens
   (:func:`worst_case_tokens`) reserved against ``tokens_per_day`` (``quota_exceeded``,
   ``exceeds_budget``);
5. the slot: a row of the shared run queue, held now (a synchronous run, up to the
   tenant's ``max_concurrent_runs``: ``concurrency_limited``) or queued (an asynchronous
   run, counted against the cap when a worker claims it).

Steps 4 and 5 commit together, and return a :class:`~patinox.control.settlement.Ticket`:
what the run holds, settled once by :class:`~patinox.control.settlement.Settlement`.

What each entry point checks here (checks that concern a request and not a run stay at
the HTTP boundary: the key, the tenant's and the key's request rates, a moving tenant's
held writes, the body size):

========================================  =====================================================
entry point                               admission
========================================  =====================================================
``POST /v1/agents/{id}/runs`` (sync)      1-5; the agent's rate state joins the response's
                                          ``RateLimit`` headers
``POST /v1/agents/{id}/runs`` (async)     1, 2, 4, and 5 as a queue entry; 3 at its claim
``patinox run`` (CLI)                     1-5 (and the tenant's state read from its row first)
``RunService.start`` (Python API)         1-5, as the route: the route is this call
``RunService.execute_claim`` (worker)     2 (a suspended tenant's run is put back, queued) and
                                          the queuing key still holding ``runs:write``; 1, 4
                                          and 5 were passed when the run was queued and are not
                                          charged again (its claim is its slot, its reservation
                                          is on the claim); 3 is the worker's claim rule
                                          (:meth:`~patinox.limits.FairShareAdmission.claimable`)
========================================  =====================================================
"""

from __future__ import annotations

from sqlalchemy import Connection

from patinox.agents import RunLimits, count_simulated_tokens
from patinox.control.settlement import Ticket
from patinox.errors import NotFound, RateLimited, TenantMoving, TenantSuspended
from patinox.limits import (
    RUNS_PER_DAY,
    Claim,
    FairRunQueue,
    FairShareAdmission,
    RateLimiter,
    RateLimitState,
    TokenBudget,
)
from patinox.storage import AgentRecord, SqlBackend, TenantRecord
from patinox.tenancy import IsolationLevel, TenantContext, get_plan

#: Seconds a synchronous run's concurrency hold outlives the run's timeout (settlement).
_HOLD_GRACE_S = 60.0
#: Longest lease of a synchronous run's hold, seconds: the longest run timeout an override
#: may set (30 days, :class:`~patinox.tenancy.LimitOverrides`) plus the settlement grace.
_HOLD_MAX_S = 30 * 86_400.0 + _HOLD_GRACE_S

#: Tokens allowed per tool call for the call itself and its result in the admission estimate.
TOOL_CALL_TOKENS = 64


def worst_case_tokens(agent: AgentRecord, prompt: str, output_tokens: int | None, limits: RunLimits) -> int:
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


def run_limits(ctx: TenantContext, agent: AgentRecord) -> RunLimits:
    """The limits of one run of ``agent``: the agent's own caps within the tenant's."""
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


#: ``moving_to`` values of a tenant changing isolation level (the others are storage models).
_LEVEL_VALUES = frozenset(level.value for level in IsolationLevel)


def changing_level(backend: SqlBackend, tenant_id: str) -> bool:
    """Whether the tenant's hold (``moving_to``) is a change of isolation level
    (:meth:`~patinox.control.tenants.TenantManager.change_level`), not a storage move:
    then its asynchronous runs are still queued, and only runs executing now wait."""
    try:
        moving = backend.get_tenant(tenant_id)["moving_to"]
    except NotFound:
        return False
    return moving in _LEVEL_VALUES


def moving_error(backend: SqlBackend, tenant_id: str) -> TenantMoving:
    """The ``tenant_moving`` refusal (503, ``Retry-After``) of a tenant on hold."""
    if changing_level(backend, tenant_id):
        what = "changing isolation level; runs start again shortly (asynchronous runs are queued meanwhile)"
    else:
        what = "moving to another storage model; writes resume shortly"
    return TenantMoving(f"this tenant is {what}", tenant_id=tenant_id, retry_after_s=2)


def _suspended(tenant_id: str) -> TenantSuspended:
    return TenantSuspended("this tenant is suspended", tenant_id=tenant_id)


class RunAdmission:
    """The one admission step of every run; see the module docstring. One per
    :class:`~patinox.control.runs.RunService`.

    Args:
        backend: the deployment's shared database (API keys).
        queue: the shared run queue (slots).
        budget: the daily quotas.
        rate: the deployment's rate-limit store (the agent's run rate).
        fair_share: this process's fair share of its capacity; ``None`` admits every run
            at once.
        holder: this process's name on the slots it holds.
    """

    def __init__(
        self,
        *,
        backend: SqlBackend,
        queue: FairRunQueue,
        budget: TokenBudget,
        rate: RateLimiter,
        fair_share: FairShareAdmission | None,
        holder: str,
    ) -> None:
        self._backend = backend
        self._queue = queue
        self._budget = budget
        self._rate = rate
        self.fair_share = fair_share
        self.holder = holder
        #: Tenants this process refuses runs of (suspended or being deleted): kept by
        #: :class:`~patinox.control.runs.RunService`'s tenant listener and watch.
        self.fenced: set[str] = set()

    def check(
        self,
        ctx: TenantContext,
        agent_id: str,
        rate_states: list[RateLimitState] | None = None,
        *,
        queued: bool = False,
    ) -> None:
        """Steps 1 and 2: the agent's run rate, then the tenant's state in this process.

        Args:
            rate_states: where to add the agent's rate state, refused or not (the HTTP
                route's ``RateLimit`` headers).
            queued: the run is asynchronous: while its tenant changes isolation level it
                is queued (and waits there until the change is done) instead of refused.

        Raises:
            RateLimited: the agent's ``per_agent_rpm`` is spent (fields as
                :meth:`~patinox.limits.WindowRateLimiter.hit`).
            LimitStoreUnavailable: the rate-limit store failed.
            TenantSuspended: the tenant is fenced in this process.
            TenantMoving: the context holds the tenant's writes (it is moving between
                storage models or isolation levels, or its row could not say it is not).
        """
        tid = ctx.tenant_id
        try:
            state = self._rate.hit(f"agent:{agent_id}", ctx.limits.per_agent_rpm, tenant_id=tid, unit="runs")
        except RateLimited as err:
            if rate_states is not None:
                rate_states.append(RateLimitState.from_refusal(err))
            raise
        if rate_states is not None:
            rate_states.append(state)
        if tid in self.fenced:
            raise _suspended(tid)
        # Refused at the HTTP boundary already (but for a run while the level changes);
        # here for every other caller.
        if ctx.writes_held and not (queued and changing_level(self._backend, tid)):
            raise moving_error(self._backend, tid)

    async def take_turn(self, ctx: TenantContext) -> bool:
        """Step 3 for a run executed here at once: wait for the tenant's turn in this
        process's fair share. A run waiting for its turn holds no slot of the tenant's cap
        and no tokens. Call :meth:`end_turn` when the run is answered if this returned True.

        Returns:
            Whether a turn was taken (False: this process admits every run at once).

        Raises:
            Overloaded: the turn did not come within ``max_wait_s``.
            TenantSuspended: the tenant was fenced while the run waited (no turn is kept).
        """
        fair_share = self.fair_share
        if fair_share is None:
            return False
        tid = ctx.tenant_id
        weight = get_plan(ctx.plan).weight
        if not fair_share.try_admit(tid, weight):
            await fair_share.admit(tid, weight)
        if tid in self.fenced:  # suspended while the run waited
            fair_share.release(tid)
            raise _suspended(tid)
        return True

    def end_turn(self, tenant_id: str) -> None:
        """The run that took a turn (:meth:`take_turn`) was answered: free the turn."""
        if self.fair_share is not None:
            self.fair_share.release(tenant_id)

    def hold(
        self, ctx: TenantContext, run_id: str, tokens: int, timeout_s: float, conn: Connection
    ) -> Ticket:
        """Steps 4 and 5 of a synchronous run, in ``conn``: count the run, reserve
        ``tokens`` and hold a slot for ``timeout_s`` seconds plus a grace.

        The hold's lease outlives the run's timeout: an expired hold means "the process
        died", and the reaper would free the slot of a run still in flight. Quotas come
        before the hold, which keeps the reservation so that the reaper can settle it if
        this process dies (and takes the ledger's and then the queue's row locks in the
        order an asynchronous admission takes them).

        Raises:
            QuotaExceeded, ExceedsBudget: a daily quota refused the run.
            ConcurrencyLimited: the tenant holds ``max_concurrent_runs`` runs already.
        """
        tid, lim = ctx.tenant_id, ctx.limits
        day = self._budget.consume(tid, RUNS_PER_DAY, 1, lim.runs_per_day, conn=conn)
        reservation = self._budget.reserve(tid, tokens, lim.tokens_per_day, conn=conn)
        self._queue.hold(
            tid,
            run_id,
            max_running=lim.max_concurrent_runs,
            holder=self.holder,
            lease_s=min(max(300.0, timeout_s + _HOLD_GRACE_S), _HOLD_MAX_S),
            reserved_tokens=reservation.tokens,
            quota_period=reservation.period,
            conn=conn,
        )
        return Ticket(tid, run_id, period=reservation.period, reserved_tokens=tokens, runs_day=day)

    def reserve(self, ctx: TenantContext, run_id: str, tokens: int, conn: Connection) -> Ticket:
        """Step 4 of an asynchronous run, in ``conn``: count the run and reserve ``tokens``
        (then :meth:`enqueue` it).

        Raises:
            QuotaExceeded, ExceedsBudget: a daily quota refused the run.
        """
        tid, lim = ctx.tenant_id, ctx.limits
        day = self._budget.consume(tid, RUNS_PER_DAY, 1, lim.runs_per_day, conn=conn)
        reservation = self._budget.reserve(tid, tokens, lim.tokens_per_day, conn=conn)
        return Ticket(
            tid, run_id, period=reservation.period, reserved_tokens=tokens, runs_day=day, slot=False
        )

    def enqueue(self, ctx: TenantContext, ticket: Ticket, conn: Connection | None) -> None:
        """Step 5 of an asynchronous run: its entry in the fair queue, carrying its
        reservation to the worker that claims it; in ``conn`` when given."""
        plan = get_plan(ctx.plan)
        self._queue.enqueue(
            ctx.tenant_id,
            ticket.run_id,
            weight=plan.weight,
            priority=plan.priority,
            max_running=ctx.limits.max_concurrent_runs,
            reserved_tokens=ticket.reserved_tokens,
            quota_period=ticket.period,
            conn=conn,
        )

    @staticmethod
    def claimed(claim: Claim) -> Ticket:
        """The ticket of a run a worker claimed: its claim is its slot, and the reservation
        made when it was queued travels on the claim (nothing is counted again)."""
        return Ticket(
            claim.tenant_id,
            claim.run_id,
            period=claim.quota_period,
            reserved_tokens=claim.reserved_tokens,
            claim=claim,
        )

    def refusal_of_claim(self, tenant: TenantRecord, principal: str) -> str | None:
        """Step 2 for a claimed run, and its queuing key: ``"suspended"`` when the tenant
        is no longer active (the run waits, queued, for its resumption; a deletion purges
        it), ``"key_revoked"`` when the API key that queued it was revoked or lost
        ``runs:write`` meanwhile (runs queued by an operator carry no key), else ``None``.
        """
        if tenant["state"] != "active":
            return "suspended"
        if principal.startswith("key_") and not self._backend.key_may(principal, tenant["id"], "runs:write"):
            return "key_revoked"
        return None
