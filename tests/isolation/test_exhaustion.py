"""Exhaustion and chaos at ``container`` and ``dedicated``: a tenant's memory bomb, fork bomb,
CPU spin, disk fill and endless loop (through the ``python`` tool) are each stopped at that
tenant's limits with their reason while another tenant runs work, which succeeds, as do the
tenant's own later runs; ``kill -9`` of random execution processes loses no run.

Limits are lowered by tenant overrides so the bombs end fast. No timing assertions.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from typing import Any

import pytest

from patinox.control import AgentSpec, RunRequest
from patinox.errors import PatinoxError
from patinox.runtime import Runtime
from patinox.tenancy import IsolationLevel, TenantContext
from tests.conftest import Deployment
from tests.isolation.test_container import code_result, python_call, sandboxed_tenant

pytestmark = pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)

SANDBOXED = [IsolationLevel.CONTAINER, IsolationLevel.DEDICATED]
GUARD_S = 120.0  # against hangs only


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("exhaustion tests need root: real cgroups and sandboxes (CI runs them as root)")


async def _start(runtime: Runtime, ctx: TenantContext, agent: str, prompt: str) -> dict[str, Any]:
    try:
        row = await runtime.runs.start(ctx, agent, RunRequest(input=prompt, output_tokens=20))
    except PatinoxError as err:
        run_id = err.fields.get("run_id")
        assert run_id, err
        row = runtime.backend.tenant_store(ctx).get_run(run_id)
    return dict(row)


def while_another_tenant_works(
    runtime: Runtime,
    deployment: Deployment,
    level: IsolationLevel,
    code: str,
    **limits: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The bomb's run (at ``level``) beside five runs of a bystander tenant, then one more
    run of the bomb's tenant: ``(bomb's run, bystander's runs, the tenant's next run)``."""
    ctx, agent = sandboxed_tenant(runtime, deployment, name="bomb", level=level, **limits)
    other, other_agent = sandboxed_tenant(
        runtime, deployment, name="bystander", level=IsolationLevel.PROCESS, tools=("calculator",)
    )

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        async with asyncio.timeout(GUARD_S):
            bomb = asyncio.ensure_future(_start(runtime, ctx, agent, python_call(code)))
            others = []
            for _ in range(5):
                others.append(
                    await _start(runtime, other, other_agent, '/call calculator {"expression": "6*7"}')
                )
            bombed = await bomb
            after = await _start(runtime, ctx, agent, python_call("print('still here')"))
            return bombed, others, after

    bombed, others, after = asyncio.run(scenario())
    assert [r["status"] for r in others] == ["succeeded"] * 5, others
    assert all("42" in str(r["output"]) for r in others)
    assert runtime.queue.held(ctx.tenant_id) == 0 and runtime.queue.held(other.tenant_id) == 0
    return bombed, others, after


def _failed_with(row: dict[str, Any], reason: str) -> None:
    assert row["status"] == "failed", row
    assert row["error"] is not None and reason in str(row["error"]), row["error"]


@pytest.mark.parametrize("level", SANDBOXED, ids=str)
def test_a_memory_bomb_fails_its_run_with_memory_limit(
    runtime: Runtime, deployment: Deployment, level: IsolationLevel
) -> None:
    code = "b = []\nwhile True:\n    b.append(b'x' * (32 * 2**20))"
    bombed, _, after = while_another_tenant_works(
        runtime, deployment, level, code, exec_memory_bytes=400 * 2**20
    )
    _failed_with(bombed, "memory_limit")
    assert after["status"] == "succeeded" and "still here" in code_result(after)["stdout"], after


@pytest.mark.parametrize("level", SANDBOXED, ids=str)
def test_a_fork_bomb_is_stopped_by_the_tenants_process_limit(
    runtime: Runtime, deployment: Deployment, level: IsolationLevel
) -> None:
    code = (
        "import os, time\n"
        "for i in range(100000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "    except OSError as err:\n"
        "        print('fork refused after', i, err)\n"
        "        break\n"
    )
    bombed, _, after = while_another_tenant_works(runtime, deployment, level, code, max_processes=40)
    if bombed["status"] == "succeeded":
        assert "fork refused after" in code_result(bombed)["stdout"], bombed
    else:
        assert bombed["error"] is not None, bombed
    assert after["status"] == "succeeded" and "still here" in code_result(after)["stdout"], after


@pytest.mark.parametrize("level", SANDBOXED, ids=str)
def test_a_cpu_spin_fails_its_run_with_cpu_limit(
    runtime: Runtime, deployment: Deployment, level: IsolationLevel
) -> None:
    bombed, _, after = while_another_tenant_works(
        runtime, deployment, level, "while True:\n    pass", cpu_seconds_per_run=1.0, code_timeout_s=60
    )
    _failed_with(bombed, "cpu_limit")
    assert after["status"] == "succeeded" and "still here" in code_result(after)["stdout"], after


@pytest.mark.parametrize("level", SANDBOXED, ids=str)
def test_filling_the_directory_fails_the_run_with_disk_limit(
    runtime: Runtime, deployment: Deployment, level: IsolationLevel
) -> None:
    code = "with open('fill', 'wb') as f:\n    while True:\n        f.write(b'x' * 2**20)"
    bombed, _, after = while_another_tenant_works(runtime, deployment, level, code, disk_bytes=8 * 2**20)
    _failed_with(bombed, "disk_limit")
    # The directory is still full: the tenant's next python call says so too.
    _failed_with(after, "disk_limit")


@pytest.mark.parametrize("level", SANDBOXED, ids=str)
def test_an_endless_loop_ends_at_the_calls_timeout(
    runtime: Runtime, deployment: Deployment, level: IsolationLevel
) -> None:
    bombed, _, after = while_another_tenant_works(
        runtime, deployment, level, "while True:\n    pass", code_timeout_s=1.0, cpu_seconds_per_run=300
    )
    assert bombed["status"] == "succeeded", bombed
    result = code_result(bombed)
    assert result["timed_out"] is True and result["exit_status"] == -signal.SIGKILL
    assert after["status"] == "succeeded"


@pytest.mark.parametrize("level", SANDBOXED, ids=str)
def test_kill_9_of_random_execution_processes_loses_no_run(
    runtime: Runtime, deployment: Deployment, level: IsolationLevel
) -> None:
    ctx, _ = sandboxed_tenant(
        runtime, deployment, name="chaos", level=level, max_concurrent_runs=4, execution_processes=4
    )
    slow = str(
        runtime.agents.create(
            ctx, AgentSpec(name="slow", model="simulated:ttft_ms=300,tpot_ms=20", tools=["python"])
        )["id"]
    )
    assert runtime.process_executor is not None
    supervisor = runtime.process_executor.supervisor
    rng = random.Random(16)

    async def wave() -> list[dict[str, Any]]:
        runs = [
            asyncio.ensure_future(_start(runtime, ctx, slow, python_call("print(sum(range(10**5)))")))
            for _ in range(4)  # the tenant's max_concurrent_runs
        ]
        while not all(r.done() for r in runs):
            await asyncio.sleep(0.15)
            pool = supervisor.pools().get(ctx.tenant_id)
            procs = [p for p in pool.processes() if p.alive] if pool is not None else []
            if procs and rng.random() < 0.5:
                os.kill(rng.choice(procs).host_pid, signal.SIGKILL)
        return [await r for r in runs]

    async def scenario() -> list[dict[str, Any]]:
        async with asyncio.timeout(GUARD_S):
            return [row for _ in range(3) for row in await wave()]

    rows = asyncio.run(scenario())
    assert all(r["status"] in ("succeeded", "failed") for r in rows), rows
    assert all(r["error"] is not None for r in rows if r["status"] == "failed"), rows
    assert any(r["status"] == "failed" for r in rows)  # the chaos hit something
    assert all(r["error"]["reason"] == "worker_crashed" for r in rows if r["status"] == "failed"), rows
    # Every run settled, killed ones with what they used before they died.
    used = sum(int(r["input_tokens"] or 0) + int(r["output_tokens"] or 0) for r in rows)
    assert runtime.budget.spent_today(ctx.tenant_id) == (used, 0)
    assert runtime.queue.held(ctx.tenant_id) == 0
    # And the pool still serves.
    after = asyncio.run(_start(runtime, ctx, slow, python_call("print('after')")))
    assert after["status"] == "succeeded", after


def _zombie(pid: int) -> bool:
    """Whether ``pid`` died and its parent has not reaped it yet."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_process_killed_while_idle_gives_its_run_to_another(
    runtime: Runtime, deployment: Deployment
) -> None:
    """An idle process SIGKILLed before the host heard of its end (its template, which
    reaps it, is stopped) is offered to the next run: the run goes to a new process and
    succeeds, since nothing of it had happened in the dead one."""
    ctx, agent = sandboxed_tenant(
        runtime,
        deployment,
        name="idle",
        level=IsolationLevel.PROCESS,
        tools=("memory_put",),
        execution_processes=1,
    )
    assert _start_sync(runtime, ctx, agent)["status"] == "succeeded"
    assert runtime.process_executor is not None
    pool = runtime.process_executor.supervisor.pools()[ctx.tenant_id]
    (dead,) = pool.processes()
    template_pid = pool.template.pid
    assert template_pid is not None

    async def scenario() -> dict[str, Any]:
        os.kill(template_pid, signal.SIGSTOP)
        try:
            os.kill(dead.host_pid, signal.SIGKILL)
            while not _zombie(dead.host_pid):
                await asyncio.sleep(0.01)
            assert dead.alive  # as far as the host knows
            run = asyncio.ensure_future(_start(runtime, ctx, agent, "after the kill"))
            await asyncio.sleep(0.5)
        finally:
            os.kill(template_pid, signal.SIGCONT)
        async with asyncio.timeout(GUARD_S):
            return await run

    row = asyncio.run(scenario())
    assert row["status"] == "succeeded", row
    assert dead not in pool.processes()


def _start_sync(runtime: Runtime, ctx: TenantContext, agent: str) -> dict[str, Any]:
    return asyncio.run(_start(runtime, ctx, agent, "warm"))
