"""A run at the ``process``, ``container`` or ``dedicated`` level ends exactly as the same
run at the ``namespace`` level: the same reply, tokens, tool calls, stored memory, error and
settlement, on SQLite and on PostgreSQL. Only where it ran differs: the execution levels
also record the CPU seconds and peak memory of their execution process.

Each test runs one scenario at every level, in one tenant per level of one deployment, and
compares.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import InvalidRequest, PatinoxError, RunFailed
from patinox.runtime import Runtime
from patinox.tenancy import IsolationLevel, LimitOverrides, StorageModel, TenantContext
from tests.conftest import Deployment

LEVELS = (
    IsolationLevel.NAMESPACE,
    IsolationLevel.PROCESS,
    IsolationLevel.CONTAINER,
    IsolationLevel.DEDICATED,
)
TOOLS = ["memory_put", "memory_get", "memory_list", "calculator", "current_time"]

pytestmark = pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)


def tenant_at(
    runtime: Runtime, level: IsolationLevel, deployment: Deployment, *, model: str, **limits: Any
) -> tuple[TenantContext, str]:
    assert runtime.process_executor is not None
    runtime.process_executor.hosts_pools = True  # as in a process that executes runs
    spec = TenantSpec(
        name=f"t-{level.value}",
        isolation_level=level,
        storage_model=StorageModel(deployment.storage_model),
        limits=LimitOverrides(**limits),
    )
    t = runtime.tenants.create(spec, actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    assert ctx.isolation_level is level
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model=model, tools=TOOLS))
    return ctx, str(agent["id"])


def outcome(runtime: Runtime, ctx: TenantContext, agent_id: str, req: RunRequest) -> dict[str, Any]:
    """Everything a run leaves that must not depend on its level (its tokens summed over the
    UTC days the run may have been charged to: a run may start before midnight and end after)."""
    days = {runtime.budget.today()}
    try:
        run = asyncio.run(runtime.runs.start(ctx, agent_id, req))
        raised = None
    except PatinoxError as err:
        raised = {"type": type(err).__name__, "message": err.message, "reason": err.fields.get("reason")}
        run_id = err.fields.get("run_id")
        run = runtime.backend.tenant_store(ctx).get_run(run_id) if run_id else None
    store = runtime.backend.tenant_store(ctx)
    fields = ("status", "output", "input_tokens", "output_tokens", "tool_calls", "error")
    return {
        "raised": raised,
        "run": None if run is None else {k: run.get(k) for k in fields},
        "usage": [(u["input_tokens"], u["output_tokens"], u["tool_calls"]) for u in store.list_usage()],
        "memory": {k: store.memory_get(k) for k in store.memory_list()},
        "spent": spent_over(runtime, ctx.tenant_id, days | {runtime.budget.today()}),
        "held": runtime.queue.held(ctx.tenant_id),
    }


def spent_over(runtime: Runtime, tenant_id: str, days: set[str]) -> tuple[int, int]:
    """(spent, reserved) tokens of the tenant summed over ``days``."""
    counts = [runtime.budget.spent_in(tenant_id, day) for day in days]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def at_both_levels(
    runtime: Runtime,
    deployment: Deployment,
    req: RunRequest,
    *,
    model: str = "simulated:instant",
    **limits: Any,
) -> dict[IsolationLevel, dict[str, Any]]:
    seen = {}
    for level in LEVELS:
        ctx, agent_id = tenant_at(runtime, level, deployment, model=model, **limits)
        seen[level] = outcome(runtime, ctx, agent_id, req)
    return seen


def assert_same_at_every_level(seen: dict[IsolationLevel, dict[str, Any]]) -> None:
    """Each level's outcome equals the namespace level's; a failure names what differs."""
    base = seen[IsolationLevel.NAMESPACE]
    differ = {
        level.value: {k: (base[k], seen[level][k]) for k in base if seen[level][k] != base[k]}
        for level in LEVELS
        if seen[level] != base
    }
    assert not differ, f"differs from namespace as (namespace, level): {differ}"


def test_a_run_with_tools_and_memory(runtime: Runtime, deployment: Deployment) -> None:
    prompt = "\n".join(
        [
            '/call memory_put {"key": "city", "value": "Lyon"}',
            '/call memory_put {"key": "country", "value": "France"}',
            '/call memory_get {"key": "city"}',
            '/call memory_list {"prefix": "c"}',
            '/call calculator {"expression": "2**10 - 24"}',
        ]
    )
    seen = at_both_levels(runtime, deployment, RunRequest(input=prompt, output_tokens=30))
    assert_same_at_every_level(seen)
    result = seen[IsolationLevel.PROCESS]
    assert result["raised"] is None and result["run"]["status"] == "succeeded"
    assert (
        'memory_get = {"value":"Lyon"}' in result["run"]["output"]
        and "calculator = 1000" in result["run"]["output"]
    )
    assert result["memory"] == {"city": "Lyon", "country": "France"} and result["run"]["tool_calls"] == 5


def test_what_each_level_records_of_its_execution(runtime: Runtime, deployment: Deployment) -> None:
    recorded = {}
    for level in LEVELS:
        ctx, agent_id = tenant_at(runtime, level, deployment, model="simulated:instant")
        asyncio.run(
            runtime.runs.start(ctx, agent_id, RunRequest(input="/call current_time {}", output_tokens=5))
        )
        [usage] = runtime.backend.tenant_store(ctx).list_usage()
        recorded[level] = usage
    assert recorded[IsolationLevel.NAMESPACE]["cpu_seconds"] is None
    assert recorded[IsolationLevel.NAMESPACE]["peak_memory_bytes"] is None
    for level in LEVELS[1:]:
        assert recorded[level]["cpu_seconds"] > 0 and recorded[level]["peak_memory_bytes"] > 0, level


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        (
            '/call calculator {"expression": "__import__(\'os\')"}\n'
            '/call memory_put {"key": "", "value": "v"}',
            None,
        ),
        ('/call calculator {"expression": "1"}\n' * 3, "tool_call_limit"),
        ("/call calculator {not json}", "model_error"),
        ('/call no_such_tool {"x": 1}', "model_error"),
    ],
    ids=["tool_refusals_told_to_the_model", "tool_call_limit", "malformed_call", "unknown_tool"],
)
def test_tool_refusals_and_run_limits(
    runtime: Runtime, deployment: Deployment, prompt: str, reason: str | None
) -> None:
    seen = at_both_levels(
        runtime, deployment, RunRequest(input=prompt, output_tokens=20), max_tool_calls_per_run=2
    )
    assert_same_at_every_level(seen)
    result = seen[IsolationLevel.PROCESS]
    if reason is None:
        assert result["run"]["status"] == "succeeded" and "calculator failed" in result["run"]["output"]
    else:
        assert result["raised"]["type"] == RunFailed.__name__ and result["raised"]["reason"] == reason
        assert result["run"]["error"]["reason"] == reason and result["held"] == 0


def test_a_store_refusal_fails_the_run_as_a_tool_error(runtime: Runtime, deployment: Deployment) -> None:
    """The tenant's memory quota is enforced by the host's store; the refusal crosses the
    channel back as the same error."""
    prompt = '/call memory_put {"key": "big", "value": "' + "x" * 2000 + '"}'
    seen = at_both_levels(runtime, deployment, RunRequest(input=prompt, output_tokens=5), memory_bytes=200)
    assert_same_at_every_level(seen)
    result = seen[IsolationLevel.PROCESS]
    assert result["raised"]["reason"] == "tool_error" and "memory_put" in result["raised"]["message"]
    assert result["memory"] == {}


def test_a_request_past_the_plan_is_refused_before_anything_runs(
    runtime: Runtime, deployment: Deployment
) -> None:
    seen = at_both_levels(
        runtime, deployment, RunRequest(input="hi", output_tokens=5), max_output_tokens_per_run=4
    )
    assert_same_at_every_level(seen)
    assert seen[IsolationLevel.PROCESS]["raised"]["type"] == InvalidRequest.__name__
    assert seen[IsolationLevel.PROCESS]["run"] is None


def test_a_queued_run_executed_by_a_worker(runtime: Runtime, deployment: Deployment) -> None:
    seen = {}
    for level in LEVELS:
        ctx, agent_id = tenant_at(runtime, level, deployment, model="simulated:instant")
        days = {runtime.budget.today()}
        queued = asyncio.run(
            runtime.runs.start(
                ctx, agent_id, RunRequest(input='/call memory_put {"key": "k", "value": "v"}', mode="async")
            )
        )
        claim = runtime.queue.claim("w", lease_s=30)
        assert claim is not None and claim.run_id == queued["id"]
        done = asyncio.run(runtime.runs.execute_claim(claim))
        assert done is not None
        seen[level] = outcome_of_record(runtime, ctx, done, days)
    assert_same_at_every_level(seen)
    assert seen[IsolationLevel.PROCESS]["run"]["status"] == "succeeded"


def outcome_of_record(
    runtime: Runtime, ctx: TenantContext, run: dict[str, Any], days: set[str]
) -> dict[str, Any]:
    store = runtime.backend.tenant_store(ctx)
    fields = ("status", "output", "input_tokens", "output_tokens", "tool_calls", "error")
    return {
        "run": {k: run.get(k) for k in fields},
        "usage": [(u["input_tokens"], u["output_tokens"], u["tool_calls"]) for u in store.list_usage()],
        "memory": {k: store.memory_get(k) for k in store.memory_list()},
        "spent": spent_over(runtime, ctx.tenant_id, days | {runtime.budget.today()}),
        "held": runtime.queue.held(ctx.tenant_id),
    }
