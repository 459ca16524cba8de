"""A run whose process dies while it settles is still charged what it used, once.

A pool tenant's run is finished in the tenant's tables and settled in the quota ledger in
one transaction. A bridge or silo tenant's run is finished in its own database and settled
in the shared one: two commits, and the process may die between them. The run that the
dead worker's lease puts back is found finished by the next worker, which then settles it.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.limits import FairRunQueue
from patinox.runtime import Runtime
from patinox.storage import utcnow
from patinox.tenancy import StorageModel, TenantContext
from tests._webhooks import ProcessDied
from tests.conftest import Deployment


def tenant(runtime: Runtime, model: StorageModel) -> tuple[TenantContext, str]:
    t = runtime.tenants.create(TenantSpec(name="alpha", storage_model=model), actor="test")
    key = runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test")
    ctx = runtime.keys.authenticate(key.secret)
    assert isinstance(ctx, TenantContext)
    spec = AgentSpec(name="a", model="simulated:instant")
    return ctx, str(runtime.agents.create(ctx, spec)["id"])


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-silo", "pg-bridge"], indirect=True)
@pytest.mark.parametrize(
    "prompt",
    ["hello there", '/call no_such_tool {"x": 1}'],
    ids=["succeeded", "agent-raised"],
)
def test_a_worker_dying_after_recording_the_run_still_has_its_tokens_charged(
    runtime: Runtime, deployment: Deployment, monkeypatch: pytest.MonkeyPatch, prompt: str
) -> None:
    """The first worker runs the agent (it succeeds, or fails having used tokens) and
    records the run, then dies before the shared database hears of it: its queue entry is
    never released. Its lease expires, the run goes back to the queue, and the next
    worker finds it finished. The day's ledger then holds the run's recorded tokens as
    spent and nothing reserved: not zero spent (the charge lost) and not the worst case
    reserved all day (the reservation kept)."""
    ctx, agent_id = tenant(runtime, StorageModel(deployment.storage_model))
    queued = asyncio.run(
        runtime.runs.start(ctx, agent_id, RunRequest(input=prompt, output_tokens=3, mode="async"))
    )
    assert runtime.budget.spent_today(ctx.tenant_id)[1] > 0
    real_release = FairRunQueue.release

    def release(self: FairRunQueue, *args: Any, holder: str | None = None, **kwargs: Any) -> bool:
        if holder == "dying":
            raise ProcessDied
        return real_release(self, *args, holder=holder, **kwargs)

    monkeypatch.setattr(FairRunQueue, "release", release)
    dying = runtime.queue.claim("dying", lease_s=30)
    assert dying is not None
    with pytest.raises(ProcessDied):
        asyncio.run(runtime.runs.execute_claim(dying))
    store = runtime.backend.tenant_store(ctx)
    # A pool tenant's run record rolled back with the settlement: the next worker runs it again.
    finished = store.get_run(queued["id"])["status"] in ("succeeded", "failed")
    assert finished == (deployment.storage_model != "pool")

    assert runtime.queue.requeue_expired(now=utcnow() + timedelta(seconds=31)) == (1, [])
    second = runtime.queue.claim("second", lease_s=30)
    assert second is not None and second.run_id == queued["id"]
    asyncio.run(runtime.runs.execute_claim(second))
    recorded = store.get_run(queued["id"])
    used = recorded["input_tokens"] + recorded["output_tokens"]
    assert recorded["status"] in ("succeeded", "failed") and used > 0
    assert runtime.budget.spent_today(ctx.tenant_id) == (used, 0)
    assert runtime.queue.held(ctx.tenant_id) == 0
    assert runtime.queue.depth(ctx.tenant_id) == 0


@pytest.mark.parametrize("deployment", ["sqlite-silo", "pg-silo"], indirect=True)
@pytest.mark.parametrize("stalled_first", [True, False], ids=["stalled-first", "second-first"])
def test_a_stalled_worker_and_the_next_one_charge_a_silo_run_once_per_execution(
    runtime: Runtime, deployment: Deployment, stalled_first: bool
) -> None:
    """A worker stalls past its lease (alive, not dead), the run goes back and a second
    worker claims it; both go on, one after the other. The first executes the run, the
    other finds it finished. The
    reservation is given back once, and the ledger spends exactly the tokens the
    executions used: the charge made before recording the run is not made twice."""
    ctx, agent_id = tenant(runtime, StorageModel(deployment.storage_model))
    queued = asyncio.run(
        runtime.runs.start(ctx, agent_id, RunRequest(input="hello there", output_tokens=3, mode="async"))
    )
    stalled = runtime.queue.claim("stalled", lease_s=30)
    assert stalled is not None
    assert runtime.queue.requeue_expired(now=utcnow() + timedelta(seconds=31)) == (1, [])
    second = runtime.queue.claim("second", lease_s=30)
    assert second is not None and second.run_id == queued["id"]
    order = [stalled, second] if stalled_first else [second, stalled]

    async def both() -> list[Any]:
        return [await runtime.runs.execute_claim(c) for c in order]

    first, then = asyncio.run(both())
    assert first["status"] == then["status"] == "succeeded"
    assert runtime.budget.spent_today(ctx.tenant_id) == (first["input_tokens"] + first["output_tokens"], 0)
    assert runtime.queue.held(ctx.tenant_id) == 0
    assert runtime.queue.depth(ctx.tenant_id) == 0


# A pool run is recorded and settled in one transaction: it cannot die between the two.
@pytest.mark.parametrize(
    ("deployment", "dies"),
    [
        ("sqlite-pool", "mid-run"),
        ("sqlite-silo", "mid-run"),
        ("sqlite-silo", "after-recording"),
        ("pg-silo", "mid-run"),
        ("pg-silo", "after-recording"),
    ],
    indirect=["deployment"],
)
def test_a_sync_run_whose_server_died_is_settled_when_its_hold_expires(
    runtime: Runtime, deployment: Deployment, monkeypatch: pytest.MonkeyPatch, dies: str
) -> None:
    """The API process running a synchronous run dies, either after the run was recorded
    finished (a silo tenant's run is recorded in its own database first) or while the
    agent runs. When its hold expires the reaper settles the run's reservation: a
    finished run keeps its result and is charged what it used; a run cut off mid-run is
    recorded as interrupted and charged its reservation (what it used is unknown). In
    neither case does the worst case stay reserved for the rest of the day."""
    ctx, agent_id = tenant(runtime, StorageModel(deployment.storage_model))
    real_release = FairRunQueue.release

    def release(self: FairRunQueue, *args: Any, holder: str | None = None, **kwargs: Any) -> bool:
        if holder is None:  # the synchronous run's own release of its hold
            raise ProcessDied
        return real_release(self, *args, holder=holder, **kwargs)

    monkeypatch.setattr(FairRunQueue, "release", release)
    if dies == "mid-run":

        async def die(*args: Any, **kwargs: Any) -> Any:
            raise ProcessDied

        monkeypatch.setattr(runtime.runs._executor, "execute", die)
    with pytest.raises(ProcessDied):
        asyncio.run(runtime.runs.start(ctx, agent_id, RunRequest(input="hello there", output_tokens=3)))
    (run,) = runtime.backend.tenant_store(ctx).list_runs()
    spent, reserved = runtime.budget.spent_today(ctx.tenant_id)
    assert reserved > 0  # held by the dead process's run
    assert runtime.queue.held(ctx.tenant_id) == 1

    assert runtime.runs.reap_expired(now=utcnow() + timedelta(days=1)) == 1
    after = runtime.backend.tenant_store(ctx).get_run(run["id"])
    assert runtime.queue.held(ctx.tenant_id) == 0
    if dies == "after-recording":
        assert after["status"] == "succeeded"
        used = after["input_tokens"] + after["output_tokens"]
        assert used > 0
        assert runtime.budget.spent_today(ctx.tenant_id) == (used, 0)
    else:
        assert after["status"] == "failed" and after["error"]["reason"] == "interrupted"
        assert runtime.budget.spent_today(ctx.tenant_id) == (spent + reserved, 0)


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_two_reapers_at_once_settle_an_expired_hold_once(
    runtime: Runtime, deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes reap at the same moment: both read the expired hold of a synchronous
    run whose server died before either commits. One of them settles it; the other finds
    nothing to do. Settled twice, the ledger would spend the reservation twice and hold
    minus one reservation."""
    ctx, agent_id = tenant(runtime, StorageModel(deployment.storage_model))
    real_release = FairRunQueue.release

    def release(self: FairRunQueue, *args: Any, holder: str | None = None, **kwargs: Any) -> bool:
        if holder is None:
            raise ProcessDied
        return real_release(self, *args, holder=holder, **kwargs)

    async def die(*args: Any, **kwargs: Any) -> Any:
        raise ProcessDied

    monkeypatch.setattr(FairRunQueue, "release", release)
    monkeypatch.setattr(runtime.runs._executor, "execute", die)
    with pytest.raises(ProcessDied):
        asyncio.run(runtime.runs.start(ctx, agent_id, RunRequest(input="hello there", output_tokens=3)))
    spent, reserved = runtime.budget.spent_today(ctx.tenant_id)
    assert reserved > 0

    # Each reaper stops right after reading the expired entries until the other has read
    # them too (a guard timeout only: the barrier is the interleaving, not a measurement).
    both_read = threading.Barrier(2, timeout=60)

    def after_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "run_queue" in statement and "lease_until <" in statement and "reserved_tokens" in statement:
            both_read.wait()

    event.listen(runtime.backend.engine, "after_cursor_execute", after_execute)
    try:
        later = utcnow() + timedelta(days=1)
        with ThreadPoolExecutor(2) as pool:
            reaped = list(pool.map(lambda _: runtime.runs.reap_expired(now=later), range(2)))
    finally:
        event.remove(runtime.backend.engine, "after_cursor_execute", after_execute)
    assert sorted(reaped) == [0, 1]
    assert runtime.budget.spent_today(ctx.tenant_id) == (spent + reserved, 0)
