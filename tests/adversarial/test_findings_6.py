"""Adversarial findings, round 6.

Each test performs an attack and asserts the CORRECT behaviour; each failed against the
build it was written for. Docstrings describe the attack and what a fixed build must do.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient


@pytest.mark.parametrize(
    "call",
    [
        '/call memory_put {"key": "\\ud800", "value": "v"}',
        '/call calculator {"expression": "1\\udfff"}',
    ],
)
def test_a_lone_surrogate_in_tool_arguments_is_a_model_error_not_an_internal_error(
    client: TestClient, make_tenant: Any, call: str
) -> None:
    """Attack: the JSON body of a run is valid UTF-8, so the API accepts it, but the prompt's
    ``/call`` line carries the JSON escape ``\\ud800`` (a lone surrogate) in the tool's
    arguments. The simulated model decoded them into a string UTF-8 cannot encode and then
    failed serialising its own tool call: the run failed with
    ``reason="internal_error"`` ("the run failed: PydanticSerializationError"), the reason
    kept for bugs, instead of a stable client-facing reason.

    Correct: arguments that cannot be encoded are a malformed ``/call``, like arguments that
    are not JSON: the run fails with ``reason="model_error"`` and nothing is stored.
    """
    a = make_tenant("alpha")
    agent = a.agent("r", tools=["memory_put", "calculator"])
    r = a.run(agent, call)
    assert r.status_code == 502, r.text
    details = r.json()["error"]["details"]
    assert details["reason"] == "model_error", details
    run = client.get(f"/v1/runs/{details['run_id']}", headers=a.h).json()
    assert run["status"] == "failed" and run["error"]["reason"] == "model_error", run
    assert client.get("/v1/memory", headers=a.h).json() == []


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
