"""RunService without HTTP: every entry point of a run passes the same admission, settlement
writes a run's records with its ticket in one transaction or one after the other as its
tenant's storage model allows, and a run's ticket is released once however the run ends.

Before admission was a module of its own, the agent's run rate was checked only by the
HTTP route: ``RunService.start`` (embedders) and ``patinox run`` started runs past it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text

from patinox.agents import RunOutcome
from patinox.control import AgentSpec, RunRequest, RunService, TenantSpec
from patinox.control.settlement import Settlement, Ticket
from patinox.errors import (
    ConcurrencyLimited,
    ExceedsBudget,
    QuotaExceeded,
    RateLimited,
    RunFailed,
    StorageError,
    TenantMoving,
    TenantSuspended,
)
from patinox.isolation import NamespaceExecutor
from patinox.limits import RUNS_PER_DAY, RateLimitState
from patinox.runtime import Runtime
from patinox.storage import TenantStore
from patinox.tenancy import IsolationLevel, LimitOverrides, StorageModel, TenantContext
from tests.conftest import Deployment

HELLO = RunRequest(input="hello there", output_tokens=3)


def tenant(
    runtime: Runtime,
    model: str = "pool",
    *,
    agent_model: str = "simulated:instant",
    level: IsolationLevel = IsolationLevel.NAMESPACE,
    **limits: Any,
) -> tuple[TenantContext, str]:
    """A tenant of storage ``model`` at isolation ``level`` with ``limits``, its key's
    context and an agent's id."""
    spec = TenantSpec(
        name="alpha",
        storage_model=StorageModel(model),
        isolation_level=level,
        limits=LimitOverrides(**limits),
    )
    t = runtime.tenants.create(spec, actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model=agent_model))
    return ctx, str(agent["id"])


def nothing_held(runtime: Runtime, tenant_id: str) -> bool:
    """No slot and no reserved token of ``tenant_id`` is left anywhere."""
    return runtime.queue.held(tenant_id) == 0 and runtime.budget.spent_today(tenant_id)[1] == 0


def runs_today(runtime: Runtime, tenant_id: str) -> int:
    """Runs of ``tenant_id`` counted against ``runs_per_day`` today (the UTC date)."""
    day = datetime.now(UTC).date().isoformat()
    query = text("SELECT spent FROM quota_ledger WHERE tenant_id = :t AND quota = :q AND period = :p")
    with runtime.backend.control_tx() as conn:
        row = conn.execute(query, {"t": tenant_id, "q": RUNS_PER_DAY, "p": day}).first()
    return 0 if row is None else int(row[0])


@pytest.fixture(params=list(IsolationLevel), ids=lambda level: level.value)
def level(request: pytest.FixtureRequest) -> IsolationLevel:
    """The isolation level the test's tenant runs at: every run path behaves the same at each
    (one tenant a test, so a ``dedicated`` one always finds its core free on two cores)."""
    return IsolationLevel(request.param)


@pytest.fixture
def releases(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int, bool]]]:
    """Every :meth:`Settlement.release` call: (run id, tokens used, in a joined transaction)."""
    calls: list[tuple[str, int, bool]] = []
    real = Settlement.release

    def release(self: Settlement, ticket: Ticket, used: int, conn: Any = None) -> None:
        calls.append((ticket.run_id, used, conn is not None))
        real(self, ticket, used, conn)

    monkeypatch.setattr(Settlement, "release", release)
    yield calls


# --- admission, per entry point ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_agent_run_rate_holds_for_runs_started_through_the_python_api(
    runtime: Runtime, mode: str, level: IsolationLevel
) -> None:
    ctx, agent_id = tenant(runtime, agent_runs_per_minute=2, level=level)
    other = str(runtime.agents.create(ctx, AgentSpec(name="b", model="simulated:instant"))["id"])
    req = RunRequest(input="hello there", output_tokens=3, mode=mode)  # type: ignore[arg-type]
    for _ in range(2):
        asyncio.run(runtime.runs.start(ctx, agent_id, req))
    with pytest.raises(RateLimited) as refused:
        asyncio.run(runtime.runs.start(ctx, agent_id, req))
    assert refused.value.fields["policy"] == "agent" and refused.value.fields["limit"] == 2
    # Refused before anything was counted or written; another agent of the tenant still runs.
    assert runs_today(runtime, ctx.tenant_id) == 2
    assert len(runtime.backend.tenant_store(ctx).list_runs()) == 2
    asyncio.run(runtime.runs.start(ctx, other, req))


def test_the_agent_run_rate_state_is_reported_refused_or_not(runtime: Runtime, level: IsolationLevel) -> None:
    """What the HTTP route turns into its ``RateLimit`` headers, from the admission itself."""
    ctx, agent_id = tenant(runtime, agent_runs_per_minute=1, level=level)
    states: list[RateLimitState] = []
    asyncio.run(runtime.runs.start(ctx, agent_id, HELLO, rate_states=states))
    with pytest.raises(RateLimited):
        asyncio.run(runtime.runs.start(ctx, agent_id, HELLO, rate_states=states))
    assert [(s.policy, s.limit, s.remaining) for s in states] == [("agent", 1, 0), ("agent", 1, 0)]


def test_a_fenced_tenant_is_refused_and_its_claimed_runs_wait(
    runtime: Runtime, level: IsolationLevel
) -> None:
    ctx, agent_id = tenant(runtime, level=level)
    queued = asyncio.run(
        runtime.runs.start(ctx, agent_id, RunRequest(input="hello there", output_tokens=3, mode="async"))
    )
    claim = runtime.queue.claim("w", lease_s=30)
    assert claim is not None and claim.run_id == queued["id"]
    runtime.tenants.suspend(ctx.tenant_id, actor="test")  # between the claim and its start
    with pytest.raises(TenantSuspended):
        asyncio.run(runtime.runs.start(ctx, agent_id, HELLO))
    # The worker's admission: the run goes back to the queue, unstarted, with its tokens.
    assert asyncio.run(runtime.runs.execute_claim(claim)) is None
    assert runtime.queue.depth(ctx.tenant_id) == 1
    assert runtime.budget.spent_today(ctx.tenant_id) == (0, claim.reserved_tokens)
    assert runtime.backend.tenant_store(ctx).get_run(queued["id"])["status"] == "queued"


def test_a_run_of_a_moving_tenant_is_refused_outside_http_too(
    runtime: Runtime, level: IsolationLevel
) -> None:
    """A context built from the row of a tenant being moved holds its writes; before, only
    the HTTP middleware read that, so ``RunService.start`` (CLI, embedders) wrote runs into
    the copy being moved away from."""
    ctx, agent_id = tenant(runtime, level=level)
    row = {**runtime.backend.get_tenant(ctx.tenant_id), "moving_to": "silo"}
    moving = TenantContext.for_tenant(row, principal=ctx.principal, scopes=ctx.scopes)
    with pytest.raises(TenantMoving) as refused:
        asyncio.run(runtime.runs.start(moving, agent_id, HELLO))
    assert refused.value.retry_after_s == 2
    assert runtime.backend.tenant_store(ctx).list_runs() == []
    assert runs_today(runtime, ctx.tenant_id) == 0 and nothing_held(runtime, ctx.tenant_id)
    asyncio.run(runtime.runs.start(ctx, agent_id, HELLO))  # the same tenant, not moving: runs


def test_a_claimed_run_is_not_admitted_twice(runtime: Runtime, level: IsolationLevel) -> None:
    """Queued runs were admitted when queued: their worker counts no agent rate, no run of
    the day and no tokens again."""
    ctx, agent_id = tenant(runtime, agent_runs_per_minute=1, level=level)
    queued = asyncio.run(
        runtime.runs.start(ctx, agent_id, RunRequest(input="hello there", output_tokens=3, mode="async"))
    )
    claim = runtime.queue.claim("w", lease_s=30)
    assert claim is not None
    done = asyncio.run(runtime.runs.execute_claim(claim))
    assert done is not None and done["id"] == queued["id"] and done["status"] == "succeeded"
    assert runs_today(runtime, ctx.tenant_id) == 1
    used = done["input_tokens"] + done["output_tokens"]
    assert runtime.budget.spent_today(ctx.tenant_id) == (used, 0) and nothing_held(runtime, ctx.tenant_id)


def test_a_claim_of_a_revoked_key_fails_its_run_and_frees_its_ticket(
    runtime: Runtime, level: IsolationLevel
) -> None:
    ctx, agent_id = tenant(runtime, level=level)
    queued = asyncio.run(
        runtime.runs.start(ctx, agent_id, RunRequest(input="hello there", output_tokens=3, mode="async"))
    )
    runtime.keys.revoke(ctx.principal, tenant_id=ctx.tenant_id, actor="test")
    claim = runtime.queue.claim("w", lease_s=30)
    assert claim is not None
    done = asyncio.run(runtime.runs.execute_claim(claim))
    assert done is not None and done["id"] == queued["id"] and done["error"]["reason"] == "key_revoked"
    assert runtime.budget.spent_today(ctx.tenant_id) == (0, 0) and nothing_held(runtime, ctx.tenant_id)


@pytest.mark.parametrize(
    ("limits", "req", "refusal"),
    [
        ({"runs_per_day": 1}, HELLO, QuotaExceeded),
        ({"tokens_per_day": 4}, HELLO, ExceedsBudget),  # its worst case is 5 tokens
        ({"tokens_per_day": 9}, HELLO, QuotaExceeded),  # the first run spends 5
    ],
    ids=["runs_per_day", "exceeds_budget", "tokens_per_day"],
)
def test_quota_refusals_leave_nothing_counted(
    runtime: Runtime, limits: dict[str, int], req: RunRequest, refusal: type[Exception], level: IsolationLevel
) -> None:
    ctx, agent_id = tenant(runtime, **limits, level=level)
    if refusal is not ExceedsBudget:
        asyncio.run(runtime.runs.start(ctx, agent_id, req))  # spends the day's quota
    spent = runtime.budget.spent_today(ctx.tenant_id)
    counted = runs_today(runtime, ctx.tenant_id)
    with pytest.raises(refusal):
        asyncio.run(runtime.runs.start(ctx, agent_id, req))
    assert (
        runtime.budget.spent_today(ctx.tenant_id) == spent and runs_today(runtime, ctx.tenant_id) == counted
    )
    assert nothing_held(runtime, ctx.tenant_id)


def test_the_slot_refuses_a_run_past_the_concurrency_cap(runtime: Runtime, level: IsolationLevel) -> None:
    ctx, agent_id = tenant(
        runtime, agent_model="simulated:ttft_ms=300,tpot_ms=0", max_concurrent_runs=1, level=level
    )

    async def scenario() -> None:
        first = asyncio.create_task(runtime.runs.start(ctx, agent_id, HELLO))
        while runtime.queue.held(ctx.tenant_id) == 0:
            await asyncio.sleep(0.005)
        with pytest.raises(ConcurrencyLimited):
            await runtime.runs.start(ctx, agent_id, HELLO)
        assert (await first)["status"] == "succeeded"

    asyncio.run(scenario())
    assert runs_today(runtime, ctx.tenant_id) == 1  # the refused run was given back
    assert nothing_held(runtime, ctx.tenant_id)


# --- settlement ----------------------------------------------------------------------------


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-pool"], indirect=True)
def test_settlement_joins_the_control_plane_transaction_only_in_the_pool(
    runtime: Runtime, deployment: Deployment, releases: list[tuple[str, int, bool]], level: IsolationLevel
) -> None:
    pool = deployment.storage_model == "pool"
    ctx, agent_id = tenant(runtime, deployment.storage_model, level=level)
    run = asyncio.run(runtime.runs.start(ctx, agent_id, HELLO))
    used = run["input_tokens"] + run["output_tokens"]
    # Pool: the run's records and its ticket in one transaction, everything at once. Silo:
    # the tokens are spent first, then the records written, then the slot freed.
    assert releases == [(run["id"], used if pool else 0, pool)]
    store = runtime.backend.tenant_store(ctx)
    assert store.get_run(run["id"])["status"] == "succeeded"
    assert [u["input_tokens"] + u["output_tokens"] for u in store.list_usage()] == [used]
    assert [a["action"] for a in store.list_audit() if a["target"] == run["id"]] == ["run.finish"]
    assert runtime.budget.spent_today(ctx.tenant_id) == (used, 0) and nothing_held(runtime, ctx.tenant_id)


def test_a_pool_settlement_whose_transaction_fails_writes_one_after_the_other(
    runtime: Runtime,
    releases: list[tuple[str, int, bool]],
    monkeypatch: pytest.MonkeyPatch,
    level: IsolationLevel,
) -> None:
    ctx, agent_id = tenant(runtime, level=level)
    real_apply = TenantStore.apply
    joined: list[bool] = []

    def apply(self: TenantStore, write: Any, *, conn: Any = None) -> None:
        if conn is not None:
            joined.append(True)
            if len(joined) == 2:  # the first is the run's row, at admission; then its settlement
                raise StorageError("database error: OperationalError")
        real_apply(self, write, conn=conn)

    monkeypatch.setattr(TenantStore, "apply", apply)
    run = asyncio.run(runtime.runs.start(ctx, agent_id, HELLO))
    used = run["input_tokens"] + run["output_tokens"]
    assert len(joined) == 2 and run["status"] == "succeeded"
    # The joined transaction rolled back; then the tokens were spent, the records written
    # and the ticket released on its own: charged once.
    assert releases == [(run["id"], 0, False)]
    assert runtime.backend.tenant_store(ctx).get_run(run["id"])["status"] == "succeeded"
    assert runtime.budget.spent_today(ctx.tenant_id) == (used, 0) and nothing_held(runtime, ctx.tenant_id)


# --- one release per ticket ----------------------------------------------------------------


class _FailsAfterTokens:
    """An executor whose run fails having used tokens (a tool error after a model call)."""

    def execute(self, *args: Any, **kwargs: Any) -> Awaitable[RunOutcome]:
        async def run() -> RunOutcome:
            raise RunFailed(
                "a tool failed", reason="tool_error", model="simulated", input_tokens=5, output_tokens=2
            )

        return run()


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo"], indirect=True)
def test_a_failed_run_releases_its_ticket_once(
    runtime: Runtime, deployment: Deployment, releases: list[tuple[str, int, bool]]
) -> None:
    ctx, agent_id = tenant(runtime, deployment.storage_model)
    runs = RunService(runtime.backend, _FailsAfterTokens(), queue=runtime.queue, budget=runtime.budget)
    with pytest.raises(RunFailed) as failed:
        asyncio.run(runs.start(ctx, agent_id, HELLO))
    run_id = failed.value.fields["run_id"]
    assert [r[0] for r in releases] == [run_id]
    assert runtime.backend.tenant_store(ctx).get_run(run_id)["error"]["reason"] == "tool_error"
    assert runtime.budget.spent_today(ctx.tenant_id) == (7, 0) and nothing_held(runtime, ctx.tenant_id)


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-pool"], indirect=True)
def test_a_run_cancelled_while_it_runs_releases_its_ticket_once(
    runtime: Runtime, deployment: Deployment, releases: list[tuple[str, int, bool]], level: IsolationLevel
) -> None:
    ctx, agent_id = tenant(
        runtime, deployment.storage_model, agent_model="simulated:ttft_ms=5000,tpot_ms=0", level=level
    )

    async def scenario() -> RunFailed:
        run = asyncio.create_task(runtime.runs.start(ctx, agent_id, HELLO))
        while runtime.queue.held(ctx.tenant_id) == 0:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # in the model call
        assert await runtime.runs.stop_tenant(ctx.tenant_id) == 1
        with pytest.raises(RunFailed) as stopped:
            await run
        return stopped.value

    err = asyncio.run(scenario())
    assert err.fields["reason"] == "tenant_stopped"
    assert [r[0] for r in releases] == [err.fields["run_id"]]
    recorded = runtime.backend.tenant_store(ctx).get_run(err.fields["run_id"])
    assert recorded["error"]["reason"] == "cancelled"
    assert nothing_held(runtime, ctx.tenant_id)


class _Counting(NamespaceExecutor):
    """The in-process executor, counting the runs it started."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0

    def execute(self, *args: Any, **kwargs: Any) -> Awaitable[RunOutcome]:
        self.started += 1
        return super().execute(*args, **kwargs)


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo"], indirect=True)
def test_a_run_cancelled_before_its_first_step_releases_its_ticket_once(
    runtime: Runtime, deployment: Deployment, releases: list[tuple[str, int, bool]]
) -> None:
    ctx, agent_id = tenant(runtime, deployment.storage_model)
    executor = _Counting()
    runs = RunService(runtime.backend, executor, queue=runtime.queue, budget=runtime.budget)

    async def scenario() -> RunFailed:
        run = asyncio.create_task(runs.start(ctx, agent_id, HELLO))
        # Admission is synchronous: once the slot is held, the run's task is scheduled and
        # has not had its first step; stop it now.
        while runtime.queue.held(ctx.tenant_id) == 0:
            await asyncio.sleep(0)
        assert await runs.stop_tenant(ctx.tenant_id) == 1
        with pytest.raises(RunFailed) as stopped:
            await run
        return stopped.value

    err = asyncio.run(scenario())
    assert executor.started == 0  # it never started: the unstarted settlement released it
    assert releases == [(err.fields["run_id"], 0, deployment.storage_model == "pool")]
    recorded = runtime.backend.tenant_store(ctx).get_run(err.fields["run_id"])
    assert recorded["status"] == "failed" and recorded["error"]["reason"] == "cancelled"
    assert runtime.budget.spent_today(ctx.tenant_id) == (0, 0) and nothing_held(runtime, ctx.tenant_id)
