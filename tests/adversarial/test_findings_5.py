"""Adversarial findings, round 5 (kept connection, fast writes, rate keys, run admission).

Each test performs an attack and asserts the CORRECT behaviour; each failed against the
build it was written for. Docstrings describe the attack and what a fixed build must do.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient


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
