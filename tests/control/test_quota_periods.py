"""A run's quotas are settled against the day it was charged to, even after midnight UTC.

The budget's clock is injected: each test admits a run a second before midnight and
moves the clock past it before the run is refunded or settled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from patinox.agents import AgentDefinition, RunOutcome
from patinox.control import AgentSpec, RunRequest, RunService, TenantSpec
from patinox.errors import RunFailed, StorageError
from patinox.isolation import NamespaceExecutor
from patinox.limits import RUNS_PER_DAY, TOKENS_PER_DAY, TokenBudget
from patinox.runtime import Runtime
from patinox.storage import SqlBackend, TenantStore, utcnow
from patinox.storage import _schema as s
from patinox.tenancy import StorageModel, TenantContext
from tests.conftest import Deployment

DAY = "2026-03-01"
NEXT_DAY = "2026-03-02"


class Clock:
    """Now, one second before midnight UTC after ``DAY``, until :meth:`pass_midnight`."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def pass_midnight(self) -> None:
        self.now = datetime(2026, 3, 2, 0, 0, 1, tzinfo=UTC)


def ledger(backend: SqlBackend, tenant_id: str, quota: str, period: str) -> tuple[int, int]:
    """(spent, reserved) of one ledger row; (0, 0) when the row does not exist."""
    q = s.quota_ledger
    with backend.control_tx() as conn:
        row = conn.execute(
            select(q.c.spent, q.c.reserved).where(
                q.c.tenant_id == tenant_id, q.c.quota == quota, q.c.period == period
            )
        ).first()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def tenant(runtime: Runtime, model: StorageModel) -> tuple[TenantContext, str]:
    t = runtime.tenants.create(TenantSpec(name="alpha", storage_model=model), actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="t").secret
    )
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant"))
    return ctx, str(agent["id"])


class PassMidnight:
    """Runs the agent, moving the clock past midnight first; ``fail`` makes it fail after."""

    def __init__(self, clock: Clock, *, fail: bool = False) -> None:
        self._clock, self._fail, self._inner = clock, fail, NamespaceExecutor()

    def execute(
        self, ctx: TenantContext, definition: AgentDefinition, prompt: str, **kw: Any
    ) -> Awaitable[RunOutcome]:
        return self._run(ctx, definition, prompt, **kw)

    async def _run(
        self, ctx: TenantContext, definition: AgentDefinition, prompt: str, **kw: Any
    ) -> RunOutcome:
        self._clock.pass_midnight()
        outcome = await self._inner.execute(ctx, definition, prompt, **kw)
        if self._fail:
            raise RunFailed(
                "failed after its model call",
                reason="tool_error",
                input_tokens=outcome.input_tokens,
                output_tokens=outcome.output_tokens,
            )
        return outcome


def service(runtime: Runtime, clock: Clock, executor: Any = None) -> RunService:
    return RunService(
        runtime.backend,
        executor or NamespaceExecutor(),
        queue=runtime.queue,
        budget=TokenBudget(runtime.backend, clock=clock),
    )


SEPARATE = ["sqlite-silo", "pg-silo", "pg-bridge"]  # tenant rows outside the shared database


@pytest.mark.parametrize("deployment", SEPARATE, indirect=True)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_admission_undone_after_midnight_gives_the_run_back_to_its_day(
    runtime: Runtime, deployment: Deployment, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The run is counted (and its tokens reserved) in the shared database a second before
    midnight; writing its row to the tenant's own database then fails, after midnight.
    The run goes back to the day that counted it, and the new day is not handed an extra
    one (``spent`` -1 there)."""
    ctx, agent_id = tenant(runtime, StorageModel(deployment.storage_model))
    clock = Clock()
    runs = service(runtime, clock)

    def fail(self: TenantStore, *args: Any, **kwargs: Any) -> None:
        clock.pass_midnight()
        raise StorageError("database error: OperationalError")

    monkeypatch.setattr(TenantStore, "apply", fail)
    with pytest.raises(StorageError):
        asyncio.run(runs.start(ctx, agent_id, RunRequest(input="hello there", output_tokens=1, mode=mode)))
    assert ledger(runtime.backend, ctx.tenant_id, RUNS_PER_DAY, DAY) == (0, 0)
    assert ledger(runtime.backend, ctx.tenant_id, RUNS_PER_DAY, NEXT_DAY) == (0, 0)
    assert ledger(runtime.backend, ctx.tenant_id, TOKENS_PER_DAY, DAY) == (0, 0)
    assert ledger(runtime.backend, ctx.tenant_id, TOKENS_PER_DAY, NEXT_DAY) == (0, 0)


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-silo"], indirect=True)
@pytest.mark.parametrize("fail", [False, True], ids=["succeeded", "failed"])
def test_a_sync_run_finishing_after_midnight_settles_against_its_day(
    runtime: Runtime, deployment: Deployment, fail: bool
) -> None:
    """Admitted before midnight, finished (or failed, having used tokens) after: the tokens
    are settled where they were reserved, and the new day owes nothing."""
    ctx, agent_id = tenant(runtime, StorageModel(deployment.storage_model))
    clock = Clock()
    runs = service(runtime, clock, PassMidnight(clock, fail=fail))
    req = RunRequest(input="hello there", output_tokens=3)
    if fail:
        with pytest.raises(RunFailed):
            asyncio.run(runs.start(ctx, agent_id, req))
        run = runtime.backend.tenant_store(ctx).list_runs()[0]
    else:
        run = asyncio.run(runs.start(ctx, agent_id, req))
    used = run["input_tokens"] + run["output_tokens"]
    assert used > 0
    assert ledger(runtime.backend, ctx.tenant_id, TOKENS_PER_DAY, DAY) == (used, 0)
    assert ledger(runtime.backend, ctx.tenant_id, TOKENS_PER_DAY, NEXT_DAY) == (0, 0)
    assert ledger(runtime.backend, ctx.tenant_id, RUNS_PER_DAY, DAY) == (1, 0)
    assert ledger(runtime.backend, ctx.tenant_id, RUNS_PER_DAY, NEXT_DAY) == (0, 0)


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-silo"], indirect=True)
def test_a_queued_run_recovered_from_a_dead_worker_after_midnight_settles_against_its_day(
    runtime: Runtime, deployment: Deployment
) -> None:
    """Queued before midnight; its first worker dies (its lease expires), and the run is
    executed again after midnight. Its tokens are settled against the day they were
    reserved on."""
    ctx, agent_id = tenant(runtime, StorageModel(deployment.storage_model))
    clock = Clock()
    runs = service(runtime, clock, PassMidnight(clock))
    queued = asyncio.run(
        runs.start(ctx, agent_id, RunRequest(input="hello there", output_tokens=3, mode="async"))
    )
    assert runtime.queue.claim("dead", lease_s=30) is not None  # then never heard of again
    assert runtime.queue.requeue_expired(now=utcnow() + timedelta(seconds=31)) == (1, [])
    claim = runtime.queue.claim("second", lease_s=30)
    assert claim is not None and claim.run_id == queued["id"]
    run = asyncio.run(runs.execute_claim(claim))
    assert run is not None and run["status"] == "succeeded"
    used = run["input_tokens"] + run["output_tokens"]
    assert ledger(runtime.backend, ctx.tenant_id, TOKENS_PER_DAY, DAY) == (used, 0)
    assert ledger(runtime.backend, ctx.tenant_id, TOKENS_PER_DAY, NEXT_DAY) == (0, 0)
