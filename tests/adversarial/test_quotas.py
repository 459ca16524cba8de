"""Daily quotas (model tokens, memory bytes) hold on every path a run can take.

Attacks: tool-call loops and retries that re-send the whole conversation, large memory
tool results, an async run's memory write, an operator limit change while a run holds a
reservation. The day's spending never passes ``tokens_per_day``, a reservation in flight
keeps counting, and stored memory stays within ``memory_bytes``. Every test performs the
attack and asserts the correct behaviour.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.runtime import Runtime
from tests.adversarial._helpers import (
    wait_in_flight,
    wait_no_runs_in_flight,
)
from tests.conftest import auth


def test_daily_token_budget_is_not_exceeded_by_tool_call_loops(client: TestClient, make_tenant: Any) -> None:
    """Attack: a tenant with ``tokens_per_day=3000`` sends a 1000-word prompt with eight
    ``/call calculator`` lines. Admission reserves only instructions + prompt + output
    (~1000 tokens), but every model request of the tool loop re-sends the whole history,
    so the run uses ~9400 tokens: three times the daily budget, in one request.

    Correct: the day's spending never passes ``tokens_per_day`` (the run is refused at
    admission, or stopped by a usage limit of its remaining budget).
    """
    a = make_tenant("alpha", limits={"tokens_per_day": 3000})
    agent = a.agent("calc", tools=["calculator"])
    prompt = " ".join(["w"] * 1000) + "\n" + "\n".join(['/call calculator {"expression": "1+1"}'] * 8)
    a.run(agent, prompt, output_tokens=1)
    usage = client.get("/v1/usage", headers=a.h).json()
    spent = sum(u["input_tokens"] + u["output_tokens"] for u in usage["records"])
    assert spent <= 3000, usage
    assert usage["tokens_today"] <= 3000, usage


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


def test_a_tool_less_agent_cannot_spend_past_the_daily_budget_on_retried_calls(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: a tenant with ``tokens_per_day=2000`` runs an agent with no tools on a prompt
    of 1,900 words ending in a ``/call`` of a tool. Admission reserves the prompt once plus
    the output (an agent without tools re-sends nothing) and passes that as the run's
    token cap, but the run still allowed the plan's 8 tool calls: the model asked for the
    unknown tool, pydantic-ai answered with a retry request that re-sent the whole
    conversation, and checks the cap only after that response: the run spent 3,821
    tokens, nearly twice the tenant's daily budget, in one run.

    Correct: the day's spending never passes ``tokens_per_day``; a run of an agent without
    tools may make no tool call, so it never re-sends its prompt.
    """
    a = make_tenant("alpha", limits={"tokens_per_day": 2000})
    agent = a.agent("r")
    prompt = " ".join(["w"] * 1900) + '\n/call memory_get {"key": "k"}'
    r = a.run(agent, prompt, output_tokens=10)
    assert r.status_code == 502, r.text
    usage = client.get("/v1/usage", headers=a.h).json()
    spent = sum(u["input_tokens"] + u["output_tokens"] for u in usage["records"])
    assert spent <= 2000, usage
    assert usage["tokens_today"] <= 2000, usage
    # Within its budget the agent still runs.
    assert a.run(agent, "hello there", output_tokens=1).status_code == 200


def test_reservations_survive_an_operator_limit_change(
    client: TestClient, make_tenant: Any, operator_key: str, runtime: Runtime
) -> None:
    """Attack: a tenant with ``tokens_per_day=1000`` starts a slow async run that reserves
    601 tokens. Any operator change to the tenant (PATCH limits, suspend/resume) calls
    ``TokenBudget.forget``, which drops the ledger with its reservations. A second run
    reserving 601 more is then admitted: 1202 tokens committed against a budget of 1000.

    Correct: the in-flight reservation still counts, and the second run is refused (429
    ``quota_exceeded``).
    """
    a = make_tenant("alpha", limits={"tokens_per_day": 1000})
    agent = a.agent("slow", model="simulated:ttft_ms=400,tpot_ms=0")
    assert a.run(agent, "x", output_tokens=600, mode="async").status_code == 202
    wait_in_flight(client, a.h, 1)
    r = client.patch(
        f"/admin/tenants/{a.id}", json={"limits": {"tokens_per_day": 1000}}, headers=auth(operator_key)
    )
    assert r.status_code == 200
    second = a.run(agent, "x", output_tokens=600, mode="async")
    wait_no_runs_in_flight(runtime, a.id)
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "quota_exceeded"


def test_tokens_of_a_run_in_flight_during_a_limit_change_are_counted(
    client: TestClient, make_tenant: Any, operator_key: str, runtime: Runtime
) -> None:
    """Attack: start a slow run, have the operator change the tenant's limits while it runs
    and read ``/v1/usage`` (the ledger is rebuilt from durable records before the run has
    settled). The run then settles into the *old* ledger, so its 101 tokens are never
    counted: ``tokens_today`` stays 0 for the rest of the UTC day and the tenant can spend
    them again.

    Correct: once the run is settled, ``tokens_today`` equals the tokens in its usage records.
    """
    a = make_tenant("alpha", limits={"tokens_per_day": 1000})
    agent = a.agent("slow", model="simulated:ttft_ms=400,tpot_ms=0")
    assert a.run(agent, "hello", output_tokens=100, mode="async").status_code == 202
    wait_in_flight(client, a.h, 1)
    r = client.patch(
        f"/admin/tenants/{a.id}", json={"limits": {"tokens_per_day": 1000}}, headers=auth(operator_key)
    )
    assert r.status_code == 200
    client.get("/v1/usage", headers=a.h)  # rebuilds the ledger while the run is in flight
    wait_no_runs_in_flight(runtime, a.id)
    usage = client.get("/v1/usage", headers=a.h).json()
    recorded = sum(u["input_tokens"] + u["output_tokens"] for u in usage["records"])
    assert recorded == 101, usage
    assert usage["tokens_today"] == recorded, usage


def _wait_run(client: TestClient, h: dict[str, str], run_id: str, deadline_s: float = 10.0) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        r = client.get(f"/v1/runs/{run_id}", headers=h).json()
        if r["status"] not in ("queued", "running"):
            return r
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} never finished")


def _memory_bytes(runtime: Runtime, tenant_id: str) -> int:
    from sqlalchemy import func, select

    from patinox.storage import _schema as s

    with runtime.backend.control_tx() as conn:
        return int(
            conn.execute(
                select(func.coalesce(func.sum(func.length(s.memory.c.value)), 0)).where(
                    s.memory.c.tenant_id == tenant_id
                )
            ).scalar_one()
        )


def test_async_run_memory_tool_obeys_the_memory_bytes_quota(
    client: TestClient, make_tenant: Any, runtime: Runtime
) -> None:
    """Attack: a tenant whose ``memory_bytes`` quota is 400 bytes cannot store a 5,000-byte
    value through PUT /v1/memory or through a synchronous run's memory_put tool (both 429
    quota_exceeded) — but the same tool call in an ``{"mode": "async"}`` run succeeds: the
    worker executes queued runs with ``backend.acting_on(tenant)``, a store made without
    the tenant's ``memory_bytes_limit``, so every async run bypasses the quota.

    Correct: the async run's write is refused too; the tenant's stored memory stays within
    its quota.
    """
    a = make_tenant("alpha", limits={"memory_bytes": 400})
    agent = a.agent("mem", tools=["memory_put"], max_tool_calls=1)
    big = "x" * 5000
    call = f'/call memory_put {{"key": "big", "value": "{big}"}}'
    # the two defended paths
    assert client.put("/v1/memory/big", json={"value": big}, headers=a.h).status_code == 429
    a.run(agent, call, output_tokens=2)
    assert _memory_bytes(runtime, a.id) == 0
    # the async path
    r = a.run(agent, call, mode="async", output_tokens=2)
    assert r.status_code == 202, r.text
    _wait_run(client, a.h, r.json()["id"])
    assert _memory_bytes(runtime, a.id) <= 400
    assert client.get("/v1/memory/big", headers=a.h).status_code == 404
