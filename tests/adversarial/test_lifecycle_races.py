"""Tenant lifecycle against runs in flight: suspend, delete and stop win over the tenant's runs.

Attacks: delete or suspend a tenant while its async run is in flight, stop it in the loop
iteration before a run's task starts, suspend it between a worker's claim and the run's
start, queue runs and get suspended. A stopped run leaves no side effect, no slot and no
reservation behind; a suspended tenant's queued runs wait for its resumption; a deleted
tenant leaves no row and is not watched for ever. Every test performs the attack and
asserts the correct behaviour.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy
from fastapi.testclient import TestClient

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import PatinoxError, RunFailed, TenantSuspended
from patinox.limits.offload import FairStorageExecutor
from patinox.runtime import Runtime
from tests.adversarial._helpers import (
    TENANT_TABLES,
    new_tenant_context,
    no_workers,
    rows_of,
    wait_in_flight,
    wait_no_runs_in_flight,
)
from tests.conftest import Deployment, TenantHandle, auth


def test_tenant_delete_during_an_async_run_leaves_no_rows_behind(
    client: TestClient, make_tenant: Any, operator_key: str, runtime: Runtime
) -> None:
    """Attack: start a slow async run whose agent writes memory, then have the operator delete
    the tenant while it is in flight. The purge runs first; the run then finishes and writes
    its memory row, its usage record and its audit record under the deleted tenant's id, so
    the "deleted" tenant's data (here a secret value) survives deletion for ever.

    Correct: after deletion and once the run is over, no row of the tenant exists (the
    run is cancelled by the delete, or its late writes are refused).
    """
    a = make_tenant("alpha")
    agent = a.agent("slow", model="simulated:ttft_ms=300,tpot_ms=0", tools=["memory_put"])
    r = a.run(
        agent,
        '/call memory_put {"key": "secret", "value": "late-write-marker"}',
        mode="async",
        output_tokens=3,
    )
    assert r.status_code == 202, r.text
    wait_in_flight(client, a.h, 1)
    assert client.delete(f"/admin/tenants/{a.id}", headers=auth(operator_key)).status_code == 200
    wait_no_runs_in_flight(runtime, a.id)
    assert rows_of(runtime, a.id) == dict.fromkeys(TENANT_TABLES, 0)


def test_suspend_during_an_async_run_stops_its_side_effects(
    client: TestClient, make_tenant: Any, operator_key: str, runtime: Runtime
) -> None:
    """Attack: start a slow async run that will call ``memory_put``, then the operator
    suspends the tenant. The run keeps going after suspension: it calls the tool, writes
    memory, consumes model tokens and is recorded as ``succeeded``, although a suspended
    tenant must have every call refused.

    Correct: once suspended, the run does not go on (it ends ``failed``) and its tool does
    not write.
    """
    a = make_tenant("alpha")
    agent = a.agent("slow", model="simulated:ttft_ms=300,tpot_ms=0", tools=["memory_put"])
    r = a.run(agent, '/call memory_put {"key": "after-suspend", "value": "v"}', mode="async", output_tokens=3)
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    wait_in_flight(client, a.h, 1)
    op = auth(operator_key)
    assert client.post(f"/admin/tenants/{a.id}/suspend", headers=op).status_code == 200
    wait_no_runs_in_flight(runtime, a.id)
    assert client.post(f"/admin/tenants/{a.id}/resume", headers=op).status_code == 200
    run = client.get(f"/v1/runs/{run_id}", headers=a.h).json()
    assert run["status"] == "failed", run
    assert client.get("/v1/memory/after-suspend", headers=a.h).status_code == 404


def test_queued_runs_of_a_suspended_tenant_are_not_claimed(runtime: Runtime, operator_key: str) -> None:
    """Attack: queue runs, get suspended, hope a worker still executes them. The claim
    skips tenants that are not active; after resume they run."""
    with no_workers(runtime) as client:
        a = TenantHandle(client, operator_key, "alpha")
        agent = a.agent("x")
        for _ in range(3):
            assert a.run(agent, "hi", mode="async", output_tokens=1).status_code == 202
        assert client.post(f"/admin/tenants/{a.id}/suspend", headers=auth(operator_key)).status_code == 200
        assert runtime.queue.claim("w") is None
        assert client.post(f"/admin/tenants/{a.id}/resume", headers=auth(operator_key)).status_code == 200
        assert runtime.queue.claim("w") is not None


#: Runs the stop finds in flight: one where storage calls run on the loop (the run's task
#: exists), none where they run in storage threads (the run is still being read).
_STOPPED_HERE = {False: 1, True: 0}


def _offloaded(runtime: Runtime) -> bool:
    return isinstance(runtime.storage, FairStorageExecutor)


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
    ctx = new_tenant_context(runtime, deployment)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant"))
    store = runtime.backend.tenant_store(ctx)

    async def scenario() -> PatinoxError:
        # Both steps run in one loop iteration: the stop cancels the run's task before it
        # starts. On PostgreSQL the run is still being looked up in a storage thread when the
        # stop comes, so the stop finds no task: the run is then refused by the fence
        # (nothing stored) or, admitted a moment before, its task is cancelled once made.
        run = asyncio.create_task(
            runtime.runs.start(ctx, agent["id"], RunRequest(input="hello", output_tokens=40))
        )
        stop = asyncio.create_task(runtime.runs.stop_tenant(ctx.tenant_id))
        assert await stop == _STOPPED_HERE[_offloaded(runtime)]
        with pytest.raises((RunFailed, TenantSuspended)) as failed:
            await run
        return failed.value

    err = asyncio.run(scenario())
    assert not runtime.runs.queue.held(ctx.tenant_id)
    assert runtime.budget.spent_today(ctx.tenant_id) == (0, 0)
    if isinstance(err, TenantSuspended):
        assert _offloaded(runtime)
        assert store.list_runs(limit=10) == []  # refused before anything was written
        return
    assert err.fields["reason"] == "tenant_stopped"
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
    ctx = new_tenant_context(runtime, deployment)
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
        assert await stop == _STOPPED_HERE[_offloaded(runtime)]
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
    ctx = new_tenant_context(runtime, deployment)
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
    gone = new_tenant_context(runtime, deployment)
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
