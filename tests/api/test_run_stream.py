"""``"mode": "stream"`` on ``POST /v1/agents/{id}/runs``: server-sent events of the run as
it goes (text deltas, tool calls and results), the run record last; refusals are ordinary
error responses, a failure after the stream began is its last event. Also the OpenAI
route's error event, on the same machinery."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from patinox.runtime import Runtime
from tests.api._server import Server, Tenant

pytestmark = pytest.mark.only_deployments("sqlite-pool", "pg-pool")


@pytest.fixture
def server(runtime: Runtime) -> Iterator[Server]:
    s = Server(runtime)
    yield s
    s.close()


def _events(t: Tenant, agent_id: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (event, data) pairs of a streamed run."""
    events: list[tuple[str, Any]] = []
    with t.server.http.stream("POST", f"/v1/agents/{agent_id}/runs", json=body, headers=t.h) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((str(name), json.loads(line.removeprefix("data: "))))
    return events


def test_a_streamed_run_sends_deltas_tool_calls_results_and_the_run_last(server: Server) -> None:
    t = server.tenant("alpha")
    agent = t.agent("calc", tools=["calculator"], model="simulated:ttft_ms=1,tpot_ms=1")
    prompt = 'sum it\n/call calculator {"expression": "2*(3+4)"}'
    events = _events(t, agent, {"input": prompt, "output_tokens": 8, "mode": "stream"})
    names = [n for n, _ in events]
    assert names[0] == "run.started" and names[-1] == "run.completed"
    assert names[1:3] == ["tool.call", "tool.result"]
    assert set(names[3:-1]) == {"text.delta"} and len(names[3:-1]) == 8
    call, result = events[1][1], events[2][1]
    assert call["tool_name"] == "calculator" and call["args"] == {"expression": "2*(3+4)"}
    assert result["tool_call_id"] == call["tool_call_id"] and result["outcome"] == "success"
    assert result["result"] == "14"
    run = events[-1][1]
    assert run["id"] == events[0][1]["run_id"] and run["status"] == "succeeded"
    assert run["output"] == "".join(d["text"] for n, d in events if n == "text.delta")
    assert run["tool_calls"] == 1 and run["output_tokens"] > 8
    stored = t.get(f"/v1/runs/{run['id']}")
    assert stored["output"] == run["output"] and stored["output_tokens"] == run["output_tokens"]
    # The same prompt not streamed records the same usage.
    plain = server.http.post(
        f"/v1/agents/{agent}/runs", json={"input": prompt, "output_tokens": 8}, headers=t.h
    ).json()
    keys = ("input_tokens", "output_tokens", "tool_calls", "output")
    assert {k: plain[k] for k in keys} == {k: run[k] for k in keys}


def test_a_refused_streamed_run_is_an_ordinary_error(server: Server) -> None:
    a, b = server.tenant("alpha"), server.tenant("beta", limits={"runs_per_day": 1})
    foreign = a.agent("x")
    r = server.http.post(f"/v1/agents/{foreign}/runs", json={"input": "hi", "mode": "stream"}, headers=b.h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    mine = b.agent("y")
    assert _events(b, mine, {"input": "hi", "mode": "stream"})[-1][0] == "run.completed"
    r = server.http.post(f"/v1/agents/{mine}/runs", json={"input": "hi", "mode": "stream"}, headers=b.h)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert a.get("/v1/runs") == []


def test_a_run_failing_after_the_stream_began_ends_with_an_error_event(server: Server) -> None:
    t = server.tenant("alpha")
    agent = t.agent("plain")  # no tools: a tool call ends the run
    events = _events(t, agent, {"input": '/call calculator {"expression": "1"}', "mode": "stream"})
    assert [n for n, _ in events] == ["run.started", "error"]
    error = events[-1][1]["error"]
    assert error["code"] == "run_failed" and error["details"]["run_id"] == events[0][1]["run_id"]
    assert t.get(f"/v1/runs/{events[0][1]['run_id']}")["status"] == "failed"
    # The OpenAI route sends it as the SDK's error event.
    stream = t.client().chat.completions.create(
        model="plain",
        messages=[{"role": "user", "content": '/call calculator {"expression": "1"}'}],
        stream=True,
    )
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "run_failed"
    assert t.get("/v1/usage")["tokens_reserved"] == 0


def test_streaming_outside_the_namespace_level_is_refused_naming_the_level(server: Server) -> None:
    t = server.tenant("alpha", isolation_level="process")
    agent = t.agent("x")
    r = server.http.post(f"/v1/agents/{agent}/runs", json={"input": "hi", "mode": "stream"}, headers=t.h)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unsupported_parameter" and err["details"]["isolation_level"] == "process"
    assert t.get("/v1/runs") == []


def test_a_client_leaving_a_native_stream_cancels_its_run(server: Server) -> None:
    t = server.tenant("alpha", limits={"max_output_tokens_per_run": 4000})
    agent = t.agent("slow", model="simulated:ttft_ms=0,tpot_ms=20")
    body = {"input": "hi", "output_tokens": 4000, "mode": "stream"}
    with server.http.stream("POST", f"/v1/agents/{agent}/runs", json=body, headers=t.h) as r:
        assert r.status_code == 200
        deltas = 0
        for line in r.iter_lines():
            deltas += line == "event: text.delta"
            if deltas == 3:
                break
    run: dict[str, Any] = {}
    for _ in range(600):
        run = t.get("/v1/runs")[0]
        if run["status"] != "running":
            break
        time.sleep(0.05)
    assert run["status"] == "failed" and run["error"]["reason"] == "cancelled"
    assert 3 <= run["output_tokens"] < 4000
    usage = t.get("/v1/usage")
    assert usage["tokens_reserved"] == 0 and usage["runs_in_flight"] == 0
