"""A run on a thread at the ``process``, ``container`` or ``dedicated`` level is sent the
thread's history, as at the ``namespace`` level: the history crosses the channel to the
tenant's execution process with the run, and the model (served by the host) is sent it.

The simulated model counts every word it is sent as an input token, so equal
``input_tokens`` at every level (and more than the same input on a fresh thread) say that
the whole history reached the model there.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from patinox.control import AgentSpec, TenantSpec
from patinox.control.threads import ThreadRunRequest, ThreadService, ThreadSpec
from patinox.runtime import Runtime
from patinox.tenancy import IsolationLevel, StorageModel, TenantContext
from tests.conftest import Deployment

LEVELS = (
    IsolationLevel.NAMESPACE,
    IsolationLevel.PROCESS,
    IsolationLevel.CONTAINER,
    IsolationLevel.DEDICATED,
)


def tenant_at(runtime: Runtime, level: IsolationLevel, deployment: Deployment) -> tuple[TenantContext, str]:
    assert runtime.process_executor is not None
    runtime.process_executor.hosts_pools = True  # as in a process that executes runs
    spec = TenantSpec(
        name=f"t-{level.value}", isolation_level=level, storage_model=StorageModel(deployment.storage_model)
    )
    t = runtime.tenants.create(spec, actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext) and ctx.isolation_level is level
    agent = runtime.agents.create(
        ctx, AgentSpec(name="a", model="simulated:instant", instructions="be brief")
    )
    return ctx, str(agent["id"])


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_the_history_reaches_the_model_at_every_level(runtime: Runtime, deployment: Deployment) -> None:
    threads = ThreadService(runtime.backend, runtime.runs)
    seen: dict[IsolationLevel, dict[str, Any]] = {}
    for level in LEVELS:
        ctx, agent = tenant_at(runtime, level, deployment)

        async def scenario(ctx: TenantContext = ctx, agent: str = agent) -> dict[str, Any]:
            th = threads.create(ctx, ThreadSpec())["id"]
            first, _ = await threads.run(
                ctx, th, ThreadRunRequest(agent_id=agent, input="alpha beta gamma", output_tokens=5)
            )
            second, added = await threads.run(
                ctx, th, ThreadRunRequest(agent_id=agent, input="delta", output_tokens=4)
            )
            fresh = threads.create(ctx, ThreadSpec())["id"]
            alone, _ = await threads.run(
                ctx, fresh, ThreadRunRequest(agent_id=agent, input="delta", output_tokens=4)
            )
            stored = runtime.backend.tenant_store(ctx).threads().history(th)
            return {
                "first": (first["input_tokens"], first["output"]),
                "second": (second["input_tokens"], second["output"]),
                "history_tokens": second["input_tokens"] - alone["input_tokens"],
                "messages": [(m["role"], m["content"]) for m in stored],
                "appended": [m["role"] for m in added],
            }

        seen[level] = asyncio.run(scenario())
    base = seen[IsolationLevel.NAMESPACE]
    assert base["history_tokens"] == 3 + 5  # the first run's input and its 5-token reply
    assert len(base["messages"]) == 4 and base["appended"] == ["user", "assistant"]
    differ = {level.value: seen[level] for level in LEVELS if seen[level] != base}
    assert not differ, f"differs from namespace {base}: {differ}"
