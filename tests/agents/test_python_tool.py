"""The python tool: model-written code through the run's code runner, end to end with the
simulated model (in-process, not sandboxed: the runner is given directly), and the rule that
only tenants at container isolation or above may have it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.agents import (
    AgentDefinition,
    RunLimits,
    RunOutcome,
    check_tool_isolation,
    required_isolation,
    run_agent,
)
from patinox.control import AgentSpec
from patinox.errors import IsolationRequired, RunFailed
from patinox.isolation.code import CodeRunner
from patinox.runtime import Runtime
from patinox.tenancy import IsolationLevel, TenantContext, effective_limits
from tests.agents.fakes import DictMemory

GUARD_S = 60.0  # a guard against a hang, never an assertion
LIMITS = RunLimits(max_output_tokens=200, max_tool_calls=5, timeout_s=GUARD_S)
CODER = AgentDefinition(name="coder", instructions="Run code.", model="simulated:instant", tools=("python",))


def _call(code: str) -> str:
    return "/call python " + json.dumps({"code": code})


async def _run(code: str, runner: CodeRunner | None, limits: RunLimits = LIMITS) -> RunOutcome:
    return await run_agent(
        CODER, _call(code), output_tokens=8, limits=limits, memory=DictMemory(), code=runner
    )


def _result(outcome: RunOutcome) -> dict[str, Any]:
    """The tool result as the model saw it (the simulated reply quotes it: ``python = {...}``)."""
    words = outcome.output.split()
    assert words[1:3] == ["python", "="], outcome.output
    result: dict[str, Any] = json.loads(words[3])
    return result


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_the_model_runs_code_and_reads_its_output(tmp_path: Path) -> None:
    runner = CodeRunner(timeout_s=GUARD_S, output_bytes=64 * 1024, cwd=tmp_path)
    outcome = await _run("print(6*7)", runner)
    assert _result(outcome) == {
        "stdout": "42\n",
        "stderr": "",
        "exit_status": 0,
        "timed_out": False,
        "truncated": False,
    }
    assert outcome.tool_calls == 1


async def test_files_stay_between_calls_of_one_run(tmp_path: Path) -> None:
    runner = CodeRunner(timeout_s=GUARD_S, output_bytes=1024, cwd=tmp_path)
    prompt = "\n".join([_call("open('n', 'w').write('6')"), _call("print(int(open('n').read())*7)")])
    outcome = await run_agent(CODER, prompt, output_tokens=8, limits=LIMITS, memory=DictMemory(), code=runner)
    words = outcome.output.split()
    assert json.loads(words[6])["stdout"] == "42\n", outcome.output


async def test_an_endless_loop_stops_at_the_code_time_limit(tmp_path: Path) -> None:
    runner = CodeRunner(timeout_s=1.0, output_bytes=1024, cwd=tmp_path)
    outcome = await _run("print('spinning', flush=True)\nwhile True: pass", runner)
    assert _result(outcome) == {
        "stdout": "spinning\n",
        "stderr": "",
        "exit_status": -9,
        "timed_out": True,
        "truncated": False,
    }


async def test_a_flood_of_output_is_truncated(tmp_path: Path) -> None:
    runner = CodeRunner(timeout_s=GUARD_S, output_bytes=1000, cwd=tmp_path)
    outcome = await _run("print('x' * 10_000_000)", runner)
    result = _result(outcome)
    assert (result["stdout"], result["truncated"], result["exit_status"]) == ("x" * 1000, True, 0)


async def test_code_a_run_timeout_cuts_short_is_killed(tmp_path: Path) -> None:
    runner = CodeRunner(timeout_s=GUARD_S, output_bytes=1024, cwd=tmp_path)
    code = "import os, time\nopen('pid', 'w').write(str(os.getpid()))\ntime.sleep(600)"
    limits = RunLimits(max_output_tokens=200, max_tool_calls=5, timeout_s=1.0)
    with pytest.raises(RunFailed) as caught:
        await _run(code, runner, limits)
    assert caught.value.reason == "timeout"
    pid = int((tmp_path / "pid").read_text())
    assert not _alive(pid)


async def test_a_full_disk_fails_the_run_with_disk_limit(tmp_path: Path) -> None:
    runner = CodeRunner(timeout_s=GUARD_S, output_bytes=1024, cwd=tmp_path)
    with pytest.raises(RunFailed) as caught:
        await _run("with open('/dev/full', 'w') as f:\n    f.write('x')", runner)
    assert (caught.value.reason, caught.value.tool) == ("disk_limit", "python")


async def test_without_a_code_sandbox_the_run_fails_and_says_why() -> None:
    with pytest.raises(RunFailed) as caught:
        await _run("print(1)", None)
    assert (caught.value.reason, caught.value.tool) == ("tool_error", "python")
    assert "container" in caught.value.message


async def test_output_too_large_for_the_token_budget_is_a_failed_result(tmp_path: Path) -> None:
    runner = CodeRunner(timeout_s=GUARD_S, output_bytes=64 * 1024, cwd=tmp_path)
    limits = RunLimits(max_output_tokens=200, max_tool_calls=5, timeout_s=GUARD_S, max_total_tokens=500)
    outcome = await _run("print('word ' * 5000)", runner, limits)
    assert outcome.output.split()[1:3] == ["python", "failed:"], outcome.output
    assert outcome.tool_calls == 0


# --- only at container isolation and above ----------------------------------------------


@pytest.mark.parametrize("level", list(IsolationLevel))
def test_the_python_tool_needs_container_or_above(level: IsolationLevel) -> None:
    allowed = level in (IsolationLevel.CONTAINER, IsolationLevel.DEDICATED)
    check_tool_isolation(["calculator", "memory_get"], level)
    if allowed:
        check_tool_isolation(["calculator", "python"], level)
        return
    with pytest.raises(IsolationRequired) as caught:
        check_tool_isolation(["calculator", "python"], level)
    err = caught.value
    assert (err.code, err.http_status) == ("isolation_required", 422)
    assert (err.tool, err.required, err.isolation_level) == ("python", "container", level.value)
    assert "'container'" in err.message and repr(level.value) in err.message


def test_required_isolation() -> None:
    assert required_isolation([]) == IsolationLevel.NAMESPACE
    assert required_isolation(["calculator"]) == IsolationLevel.NAMESPACE
    assert required_isolation(["calculator", "python"]) == IsolationLevel.CONTAINER


def _tenant(client: TestClient, runtime: Runtime) -> tuple[str, dict[str, str]]:
    operator = runtime.keys.create(tenant_id=None, name="op", scopes=None, actor="test").secret
    r = client.post("/admin/tenants", json={"name": "acme"}, headers={"Authorization": f"Bearer {operator}"})
    assert r.status_code == 201, r.text
    tenant_id = r.json()["id"]
    assert r.json()["isolation_level"] == "namespace"
    r = client.post(
        f"/admin/tenants/{tenant_id}/keys",
        json={"name": "k"},
        headers={"Authorization": f"Bearer {operator}"},
    )
    return tenant_id, {"Authorization": f"Bearer {r.json()['key']}"}


def test_the_api_refuses_python_below_container(client: TestClient, runtime: Runtime) -> None:
    _, h = _tenant(client, runtime)
    r = client.post("/v1/agents", json={"name": "coder", "tools": ["python"]}, headers=h)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "isolation_required"
    assert "'container'" in error["message"]
    assert error["details"] == {"tool": "python", "required": "container", "isolation_level": "namespace"}
    assert client.get("/v1/agents", headers=h).json() == []

    r = client.post("/v1/agents", json={"name": "calc", "tools": ["calculator"]}, headers=h)
    assert r.status_code == 201, r.text
    agent = r.json()["id"]
    r = client.patch(f"/v1/agents/{agent}", json={"tools": ["calculator", "python"]}, headers=h)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "isolation_required")
    assert client.get(f"/v1/agents/{agent}", headers=h).json()["tools"] == ["calculator"]


def test_a_container_tenant_may_define_python_agents(client: TestClient, runtime: Runtime) -> None:
    tenant_id, _ = _tenant(client, runtime)
    ctx = TenantContext(
        tenant_id=tenant_id,
        principal="key_x",
        scopes=frozenset({"agents:write", "read"}),
        plan="free",
        limits=effective_limits("free", None),
        isolation_level=IsolationLevel.CONTAINER,
    )
    row = runtime.agents.create(ctx, AgentSpec(name="coder", tools=["python"]))
    assert row["tools"] == ["python"]
    limits = effective_limits("free", None)
    runner = CodeRunner.for_limits(limits, Path("/work"))
    assert (runner.timeout_s, runner.output_bytes) == (limits.code_timeout_s, limits.code_output_bytes)
