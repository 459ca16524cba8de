"""Adversarial findings, round 5 (kept connection, fast writes, rate keys, run admission).

Each test performs an attack and asserts the CORRECT behaviour; each failed against the
build it was written for. Docstrings describe the attack and what a fixed build must do.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.api import Runtime, create_app
from patinox.storage import utcnow
from tests.conftest import TenantHandle


@pytest.mark.parametrize("tool", ["memory_get", "memory_list"])
def test_a_large_memory_tool_result_does_not_spend_past_the_daily_budget(
    client: TestClient, make_tenant: Any, tool: str
) -> None:
    """Attack: a tenant with ``tokens_per_day=2000`` stores 10,000-20,000 words of agent memory
    (one value, or keys of many words each) through ``PUT /v1/memory``, then runs an agent
    whose prompt is one ``/call memory_get`` (or ``memory_list``). Admission reserves the
    run's worst case, about 550 tokens (64 per tool call and result), and passes it as the
    run's token cap; but pydantic-ai checks the cap only after a model response, and the
    request that carries the tool's result back to the model sends all of them. The
    run was stopped after that request, with 5-10 times the tenant's
    daily budget spent in one run (billed by a real provider), and the day's ledger far past it.

    Correct: the day's spending never passes ``tokens_per_day``; a tool result that
    cannot fit in the run's remaining budget is not sent to the model.
    """
    a = make_tenant("alpha", limits={"tokens_per_day": 2000})
    agent = a.agent("reader", tools=[tool])
    if tool == "memory_get":
        r = a.client.put("/v1/memory/big", json={"value": "w " * 20_000}, headers=a.h)
        assert r.status_code == 200, r.text
        prompt = '/call memory_get {"key": "big"}'
    else:
        for i in range(100):
            key = f"k{i:03d} " + "w " * 97
            r = a.client.put(f"/v1/memory/{key}", json={"value": "v"}, headers=a.h)
            assert r.status_code == 200, r.text
        prompt = '/call memory_list {"prefix": ""}'
    a.run(agent, prompt, output_tokens=1)
    usage = client.get("/v1/usage", headers=a.h).json()
    spent = sum(u["input_tokens"] + u["output_tokens"] for u in usage["records"])
    assert spent <= 2000, usage
    assert usage["tokens_today"] <= 2000, usage
    # The tenant can still run within its budget afterwards.
    assert a.run(agent, "hello there", output_tokens=1).status_code == 200


def test_a_stalled_worker_whose_run_was_requeued_does_not_give_its_reservation_back_twice(
    runtime: Runtime, operator_key: str
) -> None:
    """Attack: a worker claims an async run, stalls past its lease (its renewals fail), the
    reaper puts the run back with its reservation, and a second worker claims it. Then
    both finish: the stalled one runs the agent, the second finds the run done. Each gave
    the run's reservation back, so the day's ``reserved`` went below zero by one
    reservation, which the tenant's next runs could spend on top of ``tokens_per_day``.

    Correct: the reservation is given back once, by the worker holding the claim; the
    tokens the stalled worker's execution used are still charged.
    """
    runtime.settings = dataclasses.replace(runtime.settings, embedded_workers=0)
    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as client:
        a = TenantHandle(client, operator_key, "alpha")
        agent = a.agent("x")
        r = a.run(agent, "hello there", mode="async", output_tokens=1)
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]
        assert runtime.budget.spent_today(a.id)[1] > 0  # the run's worst case, reserved

        stalled = runtime.queue.claim("stalled", lease_s=30)
        assert stalled is not None
        assert runtime.queue.requeue_expired(now=utcnow() + timedelta(seconds=31)) == (1, [])
        second = runtime.queue.claim("second", lease_s=30)
        assert second is not None and second.run_id == run_id

        async def both() -> None:
            await runtime.runs.execute_claim(stalled)
            await runtime.runs.execute_claim(second)

        asyncio.run(both())
        run = client.get(f"/v1/runs/{run_id}", headers=a.h).json()
        assert run["status"] == "succeeded", run
        spent, reserved = runtime.budget.spent_today(a.id)
        assert reserved == 0
        assert spent == run["input_tokens"] + run["output_tokens"]
        assert runtime.queue.held(a.id) == 0
        assert runtime.queue.depth(a.id) == 0
