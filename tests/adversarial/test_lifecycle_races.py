"""Adversarial findings, round 7.

Each test performs an attack and asserts the CORRECT behaviour; each failed against the
build it was written for. Docstrings describe the attack and what a fixed build must do.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import sqlalchemy

from patinox.api import Runtime
from patinox.control import AgentSpec, RunRequest, TenantSpec, TenantUpdate
from patinox.errors import RunFailed
from patinox.storage import utcnow
from patinox.tenancy import StorageModel, TenantContext
from tests.conftest import Deployment


def _tenant(runtime: Runtime, deployment: Deployment) -> TenantContext:
    t = runtime.tenants.create(
        TenantSpec(name="alpha", storage_model=StorageModel(deployment.storage_model)), actor="test"
    )
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    return ctx


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-silo"], indirect=True)
def test_a_sync_run_stopped_before_its_task_started_is_settled(
    runtime: Runtime, deployment: Deployment
) -> None:
    """Attack: the tenant is stopped (suspended, deleted, or the server shuts down) in the
    loop iteration after a synchronous run was admitted, before the run's task took its
    first step. The task was cancelled before its coroutine started, so none of the run's
    code ran: its ``finally`` never released the concurrency slot nor settled the token
    reservation, and the run stayed ``running``. The slot and the worst-case tokens were
    held until the hold's lease (at least 300 s) expired, and the reaper then charged the
    whole reservation for a run that never called the model.

    Correct: the run is recorded failed (``cancelled``), its slot is free and nothing is
    reserved or spent.
    """
    ctx = _tenant(runtime, deployment)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant"))
    store = runtime.backend.tenant_store(ctx)

    async def scenario() -> RunFailed:
        # Both steps run in one loop iteration: the stop cancels the run's task before it starts.
        run = asyncio.create_task(
            runtime.runs.start(ctx, agent["id"], RunRequest(input="hello", output_tokens=40))
        )
        stop = asyncio.create_task(runtime.runs.stop_tenant(ctx.tenant_id))
        assert await stop == 1
        with pytest.raises(RunFailed) as failed:
            await run
        return failed.value

    err = asyncio.run(scenario())
    assert err.fields["reason"] == "tenant_stopped"
    assert not runtime.runs.queue.held(ctx.tenant_id)
    assert runtime.budget.spent_today(ctx.tenant_id) == (0, 0)
    recorded = store.get_run(err.fields["run_id"])
    assert recorded["status"] == "failed" and recorded["error"]["reason"] == "cancelled", recorded


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-bridge"], indirect=True)
def test_a_claimed_run_stopped_before_its_task_started_is_settled(
    runtime: Runtime, deployment: Deployment
) -> None:
    """Attack: as above, for a queued run a worker has claimed: the tenant is stopped in the
    loop iteration after :meth:`RunService.execute_claim` made the run's task. None of the
    run's code ran, so the claim kept the slot and the reservation until its lease expired
    and the run, recorded ``running``, went back to the queue to run again later.

    Correct: like a run cancelled while it runs, it is recorded failed (``cancelled``), its
    queue entry released and its reservation given back.
    """
    ctx = _tenant(runtime, deployment)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant"))
    store = runtime.backend.tenant_store(ctx)

    async def scenario() -> str:
        queued = await runtime.runs.start(
            ctx, agent["id"], RunRequest(input="hello", output_tokens=40, mode="async")
        )
        claim = runtime.runs.queue.claim("w1", lease_s=600)
        assert claim is not None and claim.run_id == queued["id"]
        run = asyncio.create_task(runtime.runs.execute_claim(claim))
        stop = asyncio.create_task(runtime.runs.stop_tenant(ctx.tenant_id))
        assert await stop == 1
        assert await run is None
        return str(queued["id"])

    run_id = asyncio.run(scenario())
    assert not runtime.runs.queue.held(ctx.tenant_id)
    assert runtime.budget.spent_today(ctx.tenant_id) == (0, 0)
    recorded = store.get_run(run_id)
    assert recorded["status"] == "failed" and recorded["error"]["reason"] == "cancelled", recorded


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-silo"], indirect=True)
def test_a_run_claimed_just_before_its_tenant_was_suspended_does_not_run(
    runtime: Runtime, deployment: Deployment
) -> None:
    """Attack: a worker claims a queued run, and the tenant is suspended before the worker
    starts it (the claim and the run's start are separate steps of the worker's loop, and
    the suspension's stop finds no run of the tenant in flight yet). The worker read the
    tenant's row, suspended, and ran the run anyway: a suspended tenant's run called the
    model, wrote the tenant's memory and spent its tokens.

    Correct: the run does not start; it stays queued with its reservation, and runs once
    the tenant is resumed.
    """
    ctx = _tenant(runtime, deployment)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant", tools=["memory_put"]))
    store = runtime.backend.tenant_store(ctx)
    prompt = '/call memory_put {"key": "k", "value": "v"}'

    async def scenario() -> tuple[str, object]:
        queued = await runtime.runs.start(ctx, agent["id"], RunRequest(input=prompt, mode="async"))
        claim = runtime.runs.queue.claim("w1", lease_s=600)
        assert claim is not None
        runtime.tenants.suspend(ctx.tenant_id, actor="test")
        return str(queued["id"]), await runtime.runs.execute_claim(claim)

    run_id, result = asyncio.run(scenario())
    assert result is None
    assert store.memory_get("k") is None
    assert store.get_run(run_id)["status"] == "queued"
    spent, reserved = runtime.budget.spent_today(ctx.tenant_id)
    assert spent == 0 and reserved > 0
    assert runtime.runs.queue.held(ctx.tenant_id) == 0 and runtime.runs.queue.depth(ctx.tenant_id) == 1
    # Resumed, the run is claimed again and runs.
    runtime.tenants.resume(ctx.tenant_id, actor="test")

    async def again() -> object:
        claim = runtime.runs.queue.claim("w1", lease_s=600)
        assert claim is not None and claim.run_id == run_id
        return await runtime.runs.execute_claim(claim)

    finished = asyncio.run(again())
    assert isinstance(finished, dict) and finished["status"] == "succeeded", finished
    assert store.memory_get("k") == "v"
    assert runtime.budget.spent_today(ctx.tenant_id)[1] == 0


def test_a_sync_run_with_the_longest_timeout_keeps_its_hold_until_settlement(
    runtime: Runtime, deployment: Deployment
) -> None:
    """Attack: a tenant's ``run_timeout_s`` override is set to its bound, 30 days. A
    synchronous run's hold must outlive the run's timeout by the settlement grace (60 s),
    or the reaper takes it for a dead process's run while it still runs; but the lease was
    capped at exactly 30 days. Reaping the hold in that last minute charged the whole
    reservation and gave it back, and the live run's own settlement then gave the
    reservation back a second time: the ledger's ``reserved`` went negative, which raises
    the tenant's budget for the rest of the day by that much.

    Correct: the hold lives at least the run's timeout plus 60 s; the reaper leaves it and
    the run is settled once.
    """
    ctx = _tenant(runtime, deployment)
    runtime.tenants.update(ctx.tenant_id, TenantUpdate(limits={"run_timeout_s": 30 * 86_400}), actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=ctx.tenant_id, name="k2", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext) and ctx.limits.run_timeout_s == 30 * 86_400
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:ttft_ms=0,tpot_ms=250"))

    async def scenario() -> int:
        run = asyncio.create_task(
            runtime.runs.start(ctx, agent["id"], RunRequest(input="hello", output_tokens=40))
        )
        while not runtime.runs.queue.held(ctx.tenant_id):
            await asyncio.sleep(0.02)
        # 30 s into the settlement grace of a run that ran to its timeout.
        reaped = runtime.runs.reap_expired(utcnow() + timedelta(seconds=30 * 86_400 + 30))
        await runtime.runs.stop_tenant(ctx.tenant_id)
        with pytest.raises(RunFailed):
            await run
        return reaped

    assert asyncio.run(scenario()) == 0
    assert runtime.budget.spent_today(ctx.tenant_id)[1] == 0


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_deleted_tenants_are_not_watched_for_ever(runtime: Runtime, deployment: Deployment) -> None:
    """Attack: tenants are created and deleted. Every process keeps a fence for each tenant
    suspended or deleted while it ran (or held) its runs, and its tenant watch reads every
    fenced tenant's row once a second, on the event loop. A deleted tenant's fence was never
    lifted (its id is never reused, so it can never be resumed): each deletion in the
    process's life added one more read every second, for ever, so the serving loop of
    every tenant slowed with the number of tenants ever deleted.

    Correct: once a tenant is deleted no process watches it: a watch with nothing to stop
    reads nothing.
    """
    gone = _tenant(runtime, deployment)
    runtime.tenants.delete(gone.tenant_id, actor="test")  # deleted through this process
    elsewhere = runtime.tenants.create(TenantSpec(name="beta"), actor="test")

    async def scenario() -> int:
        # Fenced here as a process does whose runs of it were stopped; then deleted by another.
        await runtime.runs.stop_tenant(elsewhere.id)
        backend = runtime.backend
        backend.update_tenant(elsewhere.id, {"state": "deleting"}, expect_state="active")
        backend.update_tenant(elsewhere.id, {"state": "deleted"}, expect_state="deleting")
        watch = asyncio.create_task(runtime.runs.watch_tenants(interval_s=0.01))
        await asyncio.sleep(0.1)  # the watch's first ticks, which may still notice the deletion
        statements: list[str] = []

        def count(*args: object) -> None:
            statements.append(str(args[2]))

        sqlalchemy.event.listen(backend.engine, "before_cursor_execute", count)
        try:
            await asyncio.sleep(0.1)  # later ticks: timers of 0.01 s fire before this one's
        finally:
            sqlalchemy.event.remove(backend.engine, "before_cursor_execute", count)
            watch.cancel()
        return len(statements)

    assert asyncio.run(scenario()) == 0
