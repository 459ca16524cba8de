"""TenantManager.change_level in process: resuming an interrupted change, a failed one
lifting its hold, a suspended tenant, and the run service stopping only stale runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import InvalidTransition, RunFailed
from patinox.runtime import Runtime
from patinox.tenancy import IsolationLevel, TenantContext


def _process(runtime: Runtime) -> None:
    if IsolationLevel.PROCESS not in runtime.executors.levels:
        pytest.fail("this host cannot run the process isolation level (Linux with fork is needed; CI has it)")


def _audits(runtime: Runtime, tid: str) -> list[dict[str, Any]]:
    return [
        dict(a)
        for a in runtime.backend.list_audit(tid, limit=100, after_seq=0)
        if a["action"] == "tenant.isolation_level"
    ]


def test_an_interrupted_change_is_finished_by_calling_again(runtime: Runtime) -> None:
    _process(runtime)
    t = runtime.tenants.create(TenantSpec(name="acme"), actor="test")
    # A process that crashed after claiming the change: the hold is on, the level unchanged.
    assert runtime.backend.compare_and_set_tenant(t.id, {"moving_to": None}, {"moving_to": "process"})
    with pytest.raises(InvalidTransition):
        runtime.tenants.change_level(t.id, IsolationLevel.NAMESPACE, actor="test")  # moving elsewhere
    change = runtime.tenants.change_level(t.id, IsolationLevel.PROCESS, actor="test", grace_s=0)
    assert change.resumed and change.new_level is IsolationLevel.PROCESS
    row = runtime.backend.get_tenant(t.id)
    assert (row["isolation_level"], row["moving_to"]) == ("process", None)
    assert [a["detail"]["resumed"] for a in _audits(runtime, t.id)] == [True]


def test_a_suspended_tenant_changes_level_and_stays_suspended(runtime: Runtime) -> None:
    _process(runtime)
    t = runtime.tenants.create(TenantSpec(name="acme"), actor="test")
    runtime.tenants.suspend(t.id, actor="test")
    change = runtime.tenants.change_level(t.id, IsolationLevel.PROCESS, actor="test", grace_s=0)
    assert (change.runs_drained, change.runs_cancelled) == (0, 0)
    got = runtime.tenants.get(t.id)
    assert (got.state.value, got.isolation_level) == ("suspended", IsolationLevel.PROCESS)


def test_a_change_that_fails_before_its_switch_lifts_the_hold(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    _process(runtime)
    t = runtime.tenants.create(TenantSpec(name="acme"), actor="test")

    def broken(*_: Any) -> set[str]:
        raise RuntimeError("database gone")

    monkeypatch.setattr(runtime.tenants, "_in_flight", broken)
    with pytest.raises(RuntimeError):
        runtime.tenants.change_level(t.id, IsolationLevel.PROCESS, actor="test", grace_s=0)
    row = runtime.backend.get_tenant(t.id)
    assert (row["isolation_level"], row["moving_to"]) == ("namespace", None)
    (audit,) = _audits(runtime, t.id)
    assert audit["outcome"] == "failed" and audit["detail"]["error"] == "RuntimeError"


def test_only_runs_at_the_old_level_are_cancelled(runtime: Runtime) -> None:
    """A run started at the new level (after the switch) is left alone; one at the old
    level fails with reason isolation_level_change."""
    _process(runtime)
    t = runtime.tenants.create(TenantSpec(name="acme", plan="pro"), actor="test")
    key = runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test")
    ctx = runtime.keys.authenticate(key.secret)
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="slow", model="simulated:ttft_ms=3000,tpot_ms=0"))

    async def go() -> None:
        old = asyncio.ensure_future(
            runtime.runs.start(ctx, agent["id"], RunRequest(input="x", output_tokens=1))
        )
        await asyncio.sleep(0.3)
        change = await asyncio.to_thread(
            runtime.tenants.change_level,
            t.id,
            IsolationLevel.PROCESS,
            actor="test",
            drain_timeout_s=0.2,
            grace_s=0,
        )
        assert change.runs_cancelled == 1
        with pytest.raises(RunFailed) as err:
            await old
        assert err.value.reason == "isolation_level_change"
        new_ctx = runtime.keys.authenticate(key.secret)
        assert isinstance(new_ctx, TenantContext) and new_ctx.isolation_level is IsolationLevel.PROCESS
        new = asyncio.ensure_future(
            runtime.runs.start(new_ctx, agent["id"], RunRequest(input="y", output_tokens=1))
        )
        await asyncio.sleep(0.3)
        assert await runtime.runs.stop_stale(t.id, "process") == 0
        assert (await new)["status"] == "succeeded"

    asyncio.run(go())
    runs = runtime.backend.acting_on(t.id).list_runs(limit=10)
    assert sorted(r["status"] for r in runs) == ["failed", "succeeded"]
    failed = next(r for r in runs if r["status"] == "failed")
    assert failed["error"]["reason"] == "isolation_level_change"
