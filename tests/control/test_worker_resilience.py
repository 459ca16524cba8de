"""A worker survives storage failures: the queue is durable, so it retries."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import StorageError
from patinox.runtime import Runtime
from patinox.tenancy import TenantContext


def test_a_storage_failure_while_claiming_or_reaping_does_not_stop_the_worker(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first claim and the first requeue of expired runs fail as a lost connection
    would; the worker goes on, and the queued run is executed (no other worker runs: the
    app, whose lifespan starts one, is not started here)."""
    tenant = runtime.tenants.create(TenantSpec(name="alpha"), actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant"))
    worker = runtime.worker(concurrency=1, holder="resilience")
    stop = asyncio.Event()
    real_claim, real_reap = runtime.queue.claim, runtime.runs.reap_expired
    calls = {"claim": 0, "reap": 0}

    def claim(*args: Any, **kwargs: Any) -> Any:
        calls["claim"] += 1
        if calls["claim"] == 1:
            raise StorageError("database error: OperationalError")
        found = real_claim(*args, **kwargs)
        if found is None:
            stop.set()
        return found

    def reap() -> int:
        calls["reap"] += 1
        if calls["reap"] == 1:
            raise StorageError("database error: OperationalError")
        return real_reap()

    monkeypatch.setattr(runtime.queue, "claim", claim)
    monkeypatch.setattr(runtime.runs, "reap_expired", reap)
    worker._poll_s = worker._reap_s = 0.01

    async def go() -> str:
        queued = await runtime.runs.start(
            ctx,
            agent["id"],
            RunRequest(input="later", output_tokens=2, mode="async"),
        )
        await worker.run(stop)  # raises if a storage error ended the worker
        return str(queued["id"])

    run_id = asyncio.run(go())
    assert calls["claim"] >= 3 and calls["reap"] >= 2
    assert worker.completed == 1
    assert runtime.backend.tenant_store(ctx).get_run(run_id)["status"] == "succeeded"
