"""A queued run is checked against its tenant's model allow-list again when a worker
executes it: a list narrowed while the run waited fails the run (reason
``model_not_allowed``) instead of reaching the model."""

from __future__ import annotations

import asyncio

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.control.tenants import TenantUpdate
from patinox.control.worker import RunWorker
from patinox.runtime import Runtime
from patinox.tenancy import LimitOverrides, TenantContext

MODEL_B = "simulated:ttft_ms=0,tpot_ms=0"


def test_a_run_queued_before_the_list_changed_is_refused_when_executed(runtime: Runtime) -> None:
    t = runtime.tenants.create(TenantSpec(name="acme", plan="pro"), actor="test")
    secret = runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    ctx = runtime.keys.authenticate(secret)
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant"))
    queued = asyncio.run(runtime.runs.start(ctx, agent["id"], RunRequest(input="hello", mode="async")))
    assert queued["status"] == "queued"
    narrowed = LimitOverrides(allowed_models=(MODEL_B,), default_model=MODEL_B)
    runtime.tenants.update(t.id, TenantUpdate(limits=narrowed), actor="test")

    worker = RunWorker(runtime.runs, runtime.queue, holder="allow-list", concurrency=1, poll_s=0.01)
    store = runtime.backend.acting_on(t.id)

    async def work() -> None:
        stop = asyncio.Event()
        working = asyncio.ensure_future(worker.run(stop))
        for _ in range(3000):  # a guard against a hang only
            if store.get_run(queued["id"])["status"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.01)
        stop.set()
        await working

    asyncio.run(work())
    run = store.get_run(queued["id"])
    assert run["status"] == "failed", run
    assert run["error"]["reason"] == "model_not_allowed"
    assert run["output"] is None and run["output_tokens"] == 0
