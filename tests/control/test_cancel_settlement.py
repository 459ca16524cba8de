"""A run cancelled part-way (its tenant suspended or deleted, the server stopping) is
charged the tokens its completed model responses used, and its usage is recorded.

Before, a cancelled run settled with 0 tokens: a tenant whose runs were stopped part-way
paid nothing for the model responses they had already received.
"""

from __future__ import annotations

import asyncio

import pytest

from patinox.control import AgentSpec, RunRequest, TenantSpec
from patinox.errors import RunFailed
from patinox.runtime import Runtime
from patinox.tenancy import IsolationLevel, StorageModel, TenantContext
from tests.conftest import Deployment

# One tool call (a response of 2 output tokens), then a reply of 40 tokens at 0.25 s each:
# the run is stopped while the reply is still being "generated".
MODEL = "simulated:ttft_ms=0,tpot_ms=250"
PROMPT = '/call memory_put {"key": "step", "value": "one"}'


@pytest.mark.parametrize(
    "level",
    [IsolationLevel.NAMESPACE, IsolationLevel.PROCESS, IsolationLevel.CONTAINER, IsolationLevel.DEDICATED],
    ids=str,
)
@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool", "pg-silo"], indirect=True)
def test_a_run_stopped_after_a_tool_call_is_charged_what_it_used(
    runtime: Runtime, deployment: Deployment, level: IsolationLevel
) -> None:
    spec = TenantSpec(
        name="alpha", storage_model=StorageModel(deployment.storage_model), isolation_level=level
    )
    t = runtime.tenants.create(spec, actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model=MODEL, tools=["memory_put"]))
    store = runtime.backend.tenant_store(ctx)

    async def scenario() -> RunFailed:
        run = asyncio.create_task(
            runtime.runs.start(ctx, agent["id"], RunRequest(input=PROMPT, output_tokens=40))
        )
        # The tool ran, so its model response was counted: stop the run in the final reply.
        while store.memory_get("step") is None:
            assert not run.done(), run
            await asyncio.sleep(0.02)
        assert await runtime.runs.stop_tenant(ctx.tenant_id) == 1
        with pytest.raises(RunFailed) as failed:
            await run
        return failed.value

    err = asyncio.run(scenario())
    assert err.fields["reason"] == "tenant_stopped"
    recorded = store.get_run(err.fields["run_id"])
    assert recorded["status"] == "failed" and recorded["error"]["reason"] == "cancelled"
    # The tool-call response: the words of 'memory_put {"key":"step","value":"one"}'.
    assert recorded["output_tokens"] == 2 and recorded["input_tokens"] > 0
    # Tool calls are counted where the agent loop runs: in process, at once; an execution
    # process reports its count with its next message, which a run stopped just after the
    # tool wrote memory may not have sent yet (tool calls are recorded, not charged).
    calls = recorded["tool_calls"]
    assert calls == 1 if level is IsolationLevel.NAMESPACE else calls in (0, 1)
    used = recorded["input_tokens"] + recorded["output_tokens"]
    # Spent in the ledger, nothing left reserved, and one usage record with the same counts.
    assert runtime.budget.spent_today(ctx.tenant_id) == (used, 0)
    records = store.list_usage()
    assert [(r["input_tokens"], r["output_tokens"], r["tool_calls"]) for r in records] == [
        (recorded["input_tokens"], 2, calls)
    ]
