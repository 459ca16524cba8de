"""A tenant's warm execution processes: reused run after run, sized from its plan, scaled to
zero when idle and started again on demand, replaced when one dies; a process killed with
``kill -9`` mid-run fails that run alone (``worker_crashed``), which is settled with the
tokens it used, and the next run succeeds. Wall time and CPU time are the host's to enforce.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from patinox.agents import AgentDefinition, RunLimits, RunOutcome
from patinox.control import AgentSpec, RunRequest, TenantSpec, TenantUpdate
from patinox.errors import RunFailed
from patinox.isolation import PoolSettings, PoolSupervisor, ProcessExecutor, Template, TenantPool
from patinox.isolation.cgroups import detect_cgroups
from patinox.isolation.execution import ExecutionProcess
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend
from patinox.tenancy import IsolationLevel, LimitOverrides, StorageModel, TenantContext, get_plan
from tests.conftest import Deployment

GUARD_S = 60.0  # against hangs only
HELLO = RunRequest(input="hello there", output_tokens=3)
# One tool call (a response of 2 output tokens), then a reply of 40 tokens at 0.25 s each:
# long enough to act on the run while its reply is being "generated".
SLOW_MODEL = "simulated:ttft_ms=0,tpot_ms=250"
TOOL_THEN_SLOW = RunRequest(input='/call memory_put {"key": "step", "value": "one"}', output_tokens=40)
TWO_TOOLS_THEN_SLOW = RunRequest(
    input='/call memory_put {"key": "step", "value": "one"}\n'
    '/call memory_put {"key": "step", "value": "two"}',
    output_tokens=40,
)


def process_tenant(
    runtime: Runtime,
    *,
    name: str = "alpha",
    agent_model: str = "simulated:instant",
    level: IsolationLevel = IsolationLevel.PROCESS,
    storage_model: str = "pool",
    **limits: Any,
) -> tuple[TenantContext, str]:
    assert runtime.process_executor is not None
    runtime.process_executor.hosts_pools = True  # as in a process that executes runs
    spec = TenantSpec(
        name=name,
        isolation_level=level,
        storage_model=StorageModel(storage_model),
        limits=LimitOverrides(**limits),
    )
    t = runtime.tenants.create(spec, actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model=agent_model, tools=["memory_put"]))
    return ctx, str(agent["id"])


def supervisor_of(runtime: Runtime) -> PoolSupervisor:
    assert runtime.process_executor is not None
    return runtime.process_executor.supervisor


def pool_of(runtime: Runtime, tenant_id: str) -> TenantPool:
    return supervisor_of(runtime).pools()[tenant_id]


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


async def await_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def busy(pool: TenantPool) -> list[ExecutionProcess]:
    with pool._lock:
        return list(pool._busy)


def nothing_held(runtime: Runtime, tenant_id: str) -> bool:
    return runtime.queue.held(tenant_id) == 0 and runtime.budget.spent_today(tenant_id)[1] == 0


# --- reuse, sizing --------------------------------------------------------------------------------


def test_a_tenants_processes_are_warm_at_creation_and_reused_across_runs(runtime: Runtime) -> None:
    ctx, agent_id = process_tenant(runtime)
    pool = pool_of(runtime, ctx.tenant_id)  # started by the tenant's creation
    wait_until(lambda: len(pool.processes()) == pool.size == 2, "the pool warmed up")
    pids = {p.pid for p in pool.processes()}
    for _ in range(4):
        assert asyncio.run(runtime.runs.start(ctx, agent_id, HELLO))["status"] == "succeeded"
    assert {p.pid for p in pool.processes()} == pids
    assert sum(p.runs for p in pool.processes()) == 4


def test_runs_beyond_the_pool_wait_for_a_free_process(runtime: Runtime) -> None:
    ctx, agent_id = process_tenant(
        runtime, agent_model="simulated:ttft_ms=200,tpot_ms=0", execution_processes=1, max_concurrent_runs=3
    )

    async def scenario() -> list[str]:
        runs = [asyncio.create_task(runtime.runs.start(ctx, agent_id, HELLO)) for _ in range(3)]
        return [r["status"] for r in await asyncio.gather(*runs)]

    assert asyncio.run(scenario()) == ["succeeded"] * 3
    pool = pool_of(runtime, ctx.tenant_id)
    assert pool.size == 1
    [proc] = pool.processes()
    assert proc.runs == 3


# --- a process killed mid-run -----------------------------------------------------------------------


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_kill_9_of_a_process_mid_run_fails_that_run_alone_settles_it_and_the_pool_refills(
    runtime: Runtime, deployment: Deployment
) -> None:
    ctx, agent_id = process_tenant(runtime, agent_model=SLOW_MODEL, storage_model=deployment.storage_model)
    store = runtime.backend.tenant_store(ctx)
    other = str(
        runtime.agents.create(ctx, AgentSpec(name="b", model="simulated:ttft_ms=3000,tpot_ms=0"))["id"]
    )

    async def scenario() -> tuple[RunFailed, dict[str, Any], int]:
        pools = supervisor_of(runtime).pools
        bystander = asyncio.create_task(runtime.runs.start(ctx, other, HELLO))
        await await_until(lambda: len(busy(pools()[ctx.tenant_id])) == 1, "the bystander runs")
        [bystander_proc] = busy(pool_of(runtime, ctx.tenant_id))
        victim = asyncio.create_task(runtime.runs.start(ctx, agent_id, TWO_TOOLS_THEN_SLOW))
        await await_until(lambda: store.memory_get("step") == "two", "the victim's second tool ran")
        [victim_proc] = [p for p in busy(pool_of(runtime, ctx.tenant_id)) if p is not bystander_proc]
        os.kill(victim_proc.pid, signal.SIGKILL)
        with pytest.raises(RunFailed) as failed:
            await victim
        return failed.value, await bystander, victim_proc.pid

    err, survivor, killed = asyncio.run(scenario())
    assert err.fields["reason"] == "worker_crashed" and "signal 9" in err.message
    assert survivor["status"] == "succeeded"
    recorded = store.get_run(err.fields["run_id"])
    assert recorded["status"] == "failed" and recorded["error"]["reason"] == "worker_crashed"
    # Charged what it used before it died: its two tool-call responses, settled. (The host
    # hears of a successful tool call with the process's next message: the first for sure,
    # since the second call came after it; the second perhaps.)
    assert recorded["output_tokens"] == 4 and recorded["input_tokens"] > 0
    assert recorded["tool_calls"] in (1, 2)
    used = sum(r["input_tokens"] + r["output_tokens"] for r in (recorded, survivor))
    assert runtime.budget.spent_today(ctx.tenant_id) == (used, 0) and nothing_held(runtime, ctx.tenant_id)
    # The pool refilled without the dead process, and the next run succeeds.
    pool = pool_of(runtime, ctx.tenant_id)
    wait_until(lambda: len(pool.processes()) == pool.size, "the pool refilled")
    assert killed not in {p.pid for p in pool.processes()}
    fast = str(runtime.agents.create(ctx, AgentSpec(name="c", model="simulated:instant"))["id"])
    assert asyncio.run(runtime.runs.start(ctx, fast, HELLO))["status"] == "succeeded"


# --- wall time and CPU time --------------------------------------------------------------------------


@pytest.mark.parametrize("level", [IsolationLevel.NAMESPACE, IsolationLevel.PROCESS])
def test_a_run_past_its_timeout_fails_the_same_way_at_each_level(
    runtime: Runtime, level: IsolationLevel
) -> None:
    ctx, agent_id = process_tenant(
        runtime, agent_model="simulated:ttft_ms=30000,tpot_ms=0", level=level, run_timeout_s=0.5
    )
    with pytest.raises(RunFailed) as failed:
        asyncio.run(runtime.runs.start(ctx, agent_id, HELLO))
    assert failed.value.fields["reason"] == "timeout"
    assert failed.value.message == "the run exceeded its timeout of 0.5 s"
    assert (
        runtime.backend.tenant_store(ctx).get_run(failed.value.fields["run_id"])["error"]["reason"]
        == "timeout"
    )
    assert nothing_held(runtime, ctx.tenant_id)


def test_a_run_past_its_cpu_seconds_is_killed_with_cpu_limit(runtime: Runtime) -> None:
    """The host polls the process's CPU time while its run waits on a slow model reply; the
    process used more than this tiny allowance building the run, so the first poll kills it."""
    ctx, agent_id = process_tenant(runtime, agent_model=SLOW_MODEL, cpu_seconds_per_run=0.000_001)
    with pytest.raises(RunFailed) as failed:
        asyncio.run(runtime.runs.start(ctx, agent_id, TOOL_THEN_SLOW))
    assert failed.value.fields["reason"] == "cpu_limit"
    recorded = runtime.backend.tenant_store(ctx).get_run(failed.value.fields["run_id"])
    assert recorded["error"]["reason"] == "cpu_limit"
    assert failed.value.fields["cpu_seconds"] > 0.000_001
    assert nothing_held(runtime, ctx.tenant_id)


# --- idle, suspend, limits ---------------------------------------------------------------------------


def test_an_idle_pool_scales_to_zero_and_starts_again_on_the_next_run(
    deployment: Deployment,
    backend: SqlBackend,
    kek_url: str,
    exec_template: Template,
    exec_root: Path,
    exec_cgroup_prefix: str,
) -> None:
    settings = Settings(
        database_url=deployment.db_url,
        kek_url=kek_url,
        exec_root=exec_root,
        exec_idle_s=0.3,
        exec_cgroup_prefix=exec_cgroup_prefix,
    )
    rt = Runtime.build(settings, backend=backend, template=exec_template)
    try:
        ctx, agent_id = process_tenant(rt)
        assert asyncio.run(rt.runs.start(ctx, agent_id, HELLO))["status"] == "succeeded"
        pool = pool_of(rt, ctx.tenant_id)
        wait_until(lambda: not pool.processes() and not pool.warm, "the pool scaled to zero")
        assert asyncio.run(rt.runs.start(ctx, agent_id, HELLO))["status"] == "succeeded"
        assert pool.warm and pool.processes()
    finally:
        rt.close()


def test_suspending_a_tenant_stops_its_processes_and_resuming_starts_them_on_demand(runtime: Runtime) -> None:
    ctx, agent_id = process_tenant(runtime)
    assert asyncio.run(runtime.runs.start(ctx, agent_id, HELLO))["status"] == "succeeded"
    pool = pool_of(runtime, ctx.tenant_id)
    procs = pool.processes()
    runtime.tenants.suspend(ctx.tenant_id, actor="test")
    assert pool.stopped and ctx.tenant_id not in supervisor_of(runtime).pools()
    for proc in procs:
        assert proc.exit.result(GUARD_S) == -signal.SIGKILL
    runtime.tenants.resume(ctx.tenant_id, actor="test")
    assert asyncio.run(runtime.runs.start(ctx, agent_id, HELLO))["status"] == "succeeded"
    assert {p.pid for p in pool_of(runtime, ctx.tenant_id).processes()}.isdisjoint(p.pid for p in procs)


def test_new_limits_replace_the_processes_with_ones_bound_by_them(runtime: Runtime) -> None:
    ctx, _ = process_tenant(runtime, max_open_files=200)
    pool = pool_of(runtime, ctx.tenant_id)
    wait_until(lambda: len(pool.processes()) == 2, "the pool warmed up")
    before = {p.pid for p in pool.processes()}
    runtime.tenants.update(
        ctx.tenant_id,
        TenantUpdate(limits=LimitOverrides(max_open_files=300, execution_processes=1)),
        actor="test",
    )
    wait_until(
        lambda: len(procs := pool.processes()) == 1 and procs[0].pid not in before, "the pool was replaced"
    )
    [proc] = pool.processes()
    assert "Max open files            300" in Path(f"/proc/{proc.pid}/limits").read_text()


def test_a_process_past_its_tenants_memory_is_killed_with_memory_limit(runtime: Runtime) -> None:
    """The tenant's cgroup holds its processes to ``exec_memory_bytes``: a run that reads a
    large value from memory needs more, the OOM killer kills its process, and the run fails
    with ``memory_limit`` (told apart from a crash by the cgroup's OOM count); the next run
    gets a fresh process."""
    if not detect_cgroups().enforces("memory"):
        pytest.fail("this host enforces no cgroup memory limit: run as root with cgroups (CI does)")
    ctx, _ = process_tenant(runtime, exec_memory_bytes=16 * 2**20, memory_bytes=2**30, execution_processes=1)
    reader = str(
        runtime.agents.create(ctx, AgentSpec(name="r", model="simulated:instant", tools=["memory_get"]))["id"]
    )
    runtime.backend.tenant_store(ctx).memory_put("big", "x" * (24 * 2**20))  # one word: one token
    with pytest.raises(RunFailed) as failed:
        asyncio.run(runtime.runs.start(ctx, reader, RunRequest(input='/call memory_get {"key": "big"}')))
    assert failed.value.fields["reason"] == "memory_limit", failed.value.message
    recorded = runtime.backend.tenant_store(ctx).get_run(failed.value.fields["run_id"])
    assert recorded["error"]["reason"] == "memory_limit" and nothing_held(runtime, ctx.tenant_id)
    assert asyncio.run(runtime.runs.start(ctx, reader, HELLO))["status"] == "succeeded"


class _Memory:
    """A tenant's memory kept in a dict (the store is not what this test is about)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def memory_get(self, key: str) -> str | None:
        return self.values.get(key)

    def memory_put(self, key: str, value: str) -> None:
        self.values[key] = value

    def memory_list(self, prefix: str = "", limit: int = 100) -> list[str]:
        return sorted(k for k in self.values if k.startswith(prefix))[:limit]


def test_a_template_killed_with_kill_9_is_started_again_and_the_pools_recover(
    exec_root: Path, exec_cgroup_prefix: str
) -> None:
    template = Template()
    sup = PoolSupervisor.on_this_host(
        PoolSettings(exec_root=exec_root), template=template, cgroup_prefix=exec_cgroup_prefix
    )
    executor = ProcessExecutor(sup)
    ctx = TenantContext(
        tenant_id="tn_patinoxtesttemplate00000",
        principal="k",
        scopes=frozenset(),
        plan="free",
        isolation_level=IsolationLevel.PROCESS,
        limits=get_plan("free").limits,
    )
    definition = AgentDefinition(name="a", instructions="be brief", model="simulated:instant")
    limits = RunLimits(max_output_tokens=16, max_tool_calls=4, timeout_s=GUARD_S)

    def run() -> RunOutcome:
        return asyncio.run(
            executor.execute(ctx, definition, "hello", output_tokens=3, limits=limits, memory=_Memory())
        )

    try:
        assert run().output_tokens == 3
        pool = sup.pools()[ctx.tenant_id]
        before, dead = template.pid, pool.processes()
        assert before is not None
        os.kill(before, signal.SIGKILL)
        for proc in dead:  # its processes die with it
            assert proc.exit.result(GUARD_S) == -signal.SIGKILL
        assert run().output_tokens == 3  # on a new template
        assert template.pid not in (None, before)
        assert {p.pid for p in pool.processes()}.isdisjoint(p.pid for p in dead)
    finally:
        sup.close()
        template.close()
        sup.workdirs.remove(ctx.tenant_id)
