"""The OpenAI-compatible routes, driven through a real uvicorn server by the official
``openai`` SDK (sync and async clients, strict response validation): completions plain and
streamed, ``include_usage``, a tool-calling agent, ``models.list()``, every error status in
OpenAI's shape, usage identical streamed or not, and one tenant never reaching another's agent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from patinox.runtime import Runtime
from tests.api._server import Server
from tests.conftest import auth

pytestmark = pytest.mark.only_deployments("sqlite-pool", "pg-pool")


@pytest.fixture
def server(runtime: Runtime) -> Iterator[Server]:
    s = Server(runtime)
    yield s
    s.close()


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_plain_completion_is_a_run_with_usage(server: Server) -> None:
    t = server.tenant("alpha")
    t.agent("helper", instructions="be brief")
    done = t.client().chat.completions.create(model="helper", messages=_user("hello there"), max_tokens=7)
    assert done.object == "chat.completion"
    assert done.model == "helper"
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    content = choice.message.content or ""
    assert content.startswith("[simulated]") and len(content.split()) == 7
    assert done.usage is not None
    # instructions (2 words) + the prompt (2 words); 7 output tokens, as asked.
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (4, 7, 11)
    runs = t.get("/v1/runs")
    assert len(runs) == 1 and done.id == f"chatcmpl-{runs[0]['id']}"
    assert runs[0]["status"] == "succeeded" and runs[0]["output"] == content
    usage = t.get("/v1/usage")
    assert usage["tokens_today"] == 11 and usage["tokens_reserved"] == 0
    assert [(u["input_tokens"], u["output_tokens"]) for u in usage["records"]] == [(4, 7)]
    assert any(a["action"].startswith("run") for a in t.get("/v1/audit"))


def test_conversation_reaches_the_model_as_history_after_the_agents_instructions(server: Server) -> None:
    t = server.tenant("alpha")
    t.agent("helper", instructions="be brief")
    messages: list[Any] = [
        {"role": "system", "content": "answer in french"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "bonjour"},
        {"role": "user", "content": [{"type": "text", "text": "and again"}]},
    ]
    done = t.client().chat.completions.create(model="helper", messages=messages, max_completion_tokens=3)
    assert done.usage is not None
    # Every turn is sent: instructions 2 + system 3 + user 2 + assistant 1 + user 2 words.
    assert done.usage.prompt_tokens == 10 and done.usage.completion_tokens == 3
    # The run's input is the last user message.
    assert t.get("/v1/runs")[0]["input"] == "and again"


def test_streamed_completion_in_the_chunk_format(server: Server) -> None:
    t = server.tenant("alpha")
    t.agent("helper", model="simulated:ttft_ms=5,tpot_ms=2")
    stream = t.client().chat.completions.create(
        model="helper", messages=_user("hello there"), max_tokens=6, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("[simulated]") and len(text.split()) == 6
    # Real deltas: one per word, not the whole reply at once.
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 6
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    run = t.get("/v1/runs")[0]
    assert chunks[0].id == f"chatcmpl-{run['id']}" and run["output"] == text


def test_include_usage_adds_one_final_usage_chunk(server: Server) -> None:
    t = server.tenant("alpha")
    t.agent("helper")
    stream = t.client().chat.completions.create(
        model="helper",
        messages=_user("hello there"),
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 5)
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["stop"]


def test_the_wire_format_ends_with_done_and_sends_usage_null(server: Server) -> None:
    t = server.tenant("alpha")
    t.agent("helper")
    body = {
        "model": "helper",
        "messages": _user("hi"),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with server.http.stream("POST", "/v1/chat/completions", json=body, headers=t.h) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" in p for p in payloads)
    assert [p["usage"] is None for p in payloads] == [True] * (len(payloads) - 1) + [False]


def test_streamed_and_plain_runs_of_one_prompt_record_identical_usage(server: Server) -> None:
    t = server.tenant("alpha")
    t.agent("calc", tools=["calculator"], instructions="use tools")
    prompt = 'work it out\n/call calculator {"expression": "2*(3+4)"}'
    client = t.client()
    plain = client.chat.completions.create(model="calc", messages=_user(prompt), max_tokens=9)
    streamed = list(
        client.chat.completions.create(
            model="calc",
            messages=_user(prompt),
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert plain.usage is not None and streamed[-1].usage is not None
    assert plain.usage.model_dump() == streamed[-1].usage.model_dump()
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == plain.choices[0].message.content
    assert "calculator = 14" in text
    records = t.get("/v1/usage")["records"]
    keys = ("input_tokens", "output_tokens", "tool_calls")
    assert len(records) == 2 and {k: records[0][k] for k in keys} == {k: records[1][k] for k in keys}
    assert records[0]["tool_calls"] == 1


def test_models_list_names_the_tenants_agents_only(server: Server) -> None:
    a, b = server.tenant("alpha"), server.tenant("beta")
    a.agent("one")
    a.agent("two")
    b.agent("three")
    models = a.client().models.list()
    assert sorted(m.id for m in models.data) == ["one", "two"]
    assert all(m.object == "model" for m in models.data)
    assert a.client().models.retrieve("one").id == "one"
    with pytest.raises(openai.NotFoundError):
        b.client().models.retrieve("one")


def test_a_tenant_cannot_reach_another_tenants_agent(server: Server) -> None:
    a, b = server.tenant("alpha"), server.tenant("beta")
    agent_id = a.agent("secret")
    errors = []
    for model in ("secret", agent_id, "nobody"):
        with pytest.raises(openai.NotFoundError) as info:
            b.client().chat.completions.create(model=model, messages=_user("hi"))
        body = info.value.body
        assert isinstance(body, dict)
        errors.append({**body, "message": body["message"].replace(repr(model), "X")})
    # A foreign name, a foreign id and a missing name answer identically.
    assert errors[0] == errors[1] == errors[2]
    assert errors[0]["param"] == "model" and errors[0]["type"] == "invalid_request_error"
    assert set(errors[0]) == {"message", "type", "param", "code"}
    assert a.get("/v1/runs") == [] and b.get("/v1/runs") == []
    # By id it works for its owner.
    assert a.client().chat.completions.create(model=agent_id, messages=_user("hi")).choices


def test_401_in_openai_shape(server: Server) -> None:
    t = server.tenant("alpha")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="ptx_wrong", _strict_response_validation=True)
    server.clients.append(bad)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="x", messages=_user("hi"))
    assert isinstance(info.value.body, dict)
    assert info.value.body["type"] == "authentication_error"
    assert info.value.body["code"] == "unauthenticated"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # The native routes keep their own shape.
    r = server.http.get("/v1/agents", headers=auth("ptx_wrong"))
    assert r.status_code == 401 and set(r.json()["error"]) == {"code", "message", "details"}
    assert t.get("/v1/agents") == []


def test_422_for_a_malformed_request(server: Server) -> None:
    t = server.tenant("alpha")
    t.agent("helper")
    client = t.client()
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="helper", messages=[])
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "invalid_request"
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="helper", messages=[{"role": "assistant", "content": "hi"}])
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "messages"
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="helper", messages=_user("hi"), max_tokens=100_000)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "output_tokens"
    assert t.get("/v1/runs") == []


@pytest.mark.parametrize(
    ("param", "extra"),
    [
        ("n", {"n": 2}),
        ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
        ("response_format", {"response_format": {"type": "json_object"}}),
        ("stream_options", {"stream_options": {"include_usage": True}}),
    ],
)
def test_unsupported_parameters_are_refused_by_name(
    server: Server, param: str, extra: dict[str, Any]
) -> None:
    t = server.tenant("alpha")
    t.agent("helper")
    with pytest.raises(openai.BadRequestError) as info:
        t.client().chat.completions.create(model="helper", messages=_user("hi"), **extra)
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == "unsupported_parameter" and info.value.body["param"] == param
    assert t.get("/v1/runs") == []


def test_429_rate_limit_carries_retry_after(server: Server) -> None:
    t = server.tenant("alpha", limits={"requests_per_minute": 2})
    t.agent("helper")
    client = t.client(max_retries=0)
    client.chat.completions.create(model="helper", messages=_user("hi"))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="helper", messages=_user("hi"))
    assert int(info.value.response.headers["Retry-After"]) >= 1
    assert "x-should-retry" not in info.value.response.headers
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "rate_limited"
    assert info.value.body["type"] == "rate_limit_error"


def test_429_quota_is_not_retried_by_the_sdk(server: Server) -> None:
    t = server.tenant("alpha", limits={"runs_per_day": 1})
    t.agent("helper")
    client = t.client(max_retries=3)
    client.chat.completions.create(model="helper", messages=_user("hi"))
    before = server.requests["/v1/chat/completions"]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="helper", messages=_user("hi"))
    assert info.value.response.headers["x-should-retry"] == "false"
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "quota_exceeded"
    assert info.value.body["type"] == "insufficient_quota"
    # One request reached the server: the SDK did not retry it.
    assert server.requests["/v1/chat/completions"] - before == 1


def test_async_client_plain_and_streamed(server: Server) -> None:
    t = server.tenant("alpha")
    t.agent("helper")

    async def main() -> tuple[Any, list[Any]]:
        async with t.async_client() as client:
            plain = await client.chat.completions.create(model="helper", messages=_user("hi"), max_tokens=4)
            stream = await client.chat.completions.create(
                model="helper",
                messages=_user("hi"),
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
            return plain, [c async for c in stream]

    plain, chunks = asyncio.run(main())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_a_disconnect_mid_stream_cancels_and_settles_the_run(server: Server) -> None:
    t = server.tenant("alpha", limits={"max_output_tokens_per_run": 4000})
    t.agent("slow", model="simulated:ttft_ms=0,tpot_ms=20")
    body = {"model": "slow", "messages": _user("hi"), "max_tokens": 4000, "stream": True}
    with server.http.stream("POST", "/v1/chat/completions", json=body, headers=t.h) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                seen += 1
            if seen == 3:
                break
    # The client went away: the run is cancelled, and its reservation settled.
    run: dict[str, Any] = {}
    for _ in range(600):
        run = t.get("/v1/runs")[0]
        if run["status"] != "running":
            break
        time.sleep(0.05)
    assert run["status"] == "failed" and run["error"]["reason"] == "cancelled"
    usage = t.get("/v1/usage")
    assert usage["tokens_reserved"] == 0 and usage["runs_in_flight"] == 0
    [record] = usage["records"]
    # Charged what it used, not its 4000-token reservation.
    assert usage["tokens_today"] == record["input_tokens"] + record["output_tokens"]
    assert 3 <= record["output_tokens"] < 4000


def test_streaming_at_process_level_is_refused_naming_the_level(server: Server) -> None:
    t = server.tenant("alpha", isolation_level="process")
    t.agent("helper")
    client = t.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="helper", messages=_user("hi"), stream=True)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "stream"
    assert "'process'" in info.value.body["message"]
    # A single user message, not streamed, runs there as on the native route.
    done = client.chat.completions.create(model="helper", messages=_user("hi"), max_tokens=3)
    assert done.usage is not None and done.usage.completion_tokens == 3


def test_the_token_reservation_counts_every_message(server: Server) -> None:
    t = server.tenant("alpha", limits={"tokens_per_day": 100})
    t.agent("helper")
    client = t.client()
    earlier: list[Any] = [{"role": "user", "content": "word " * 120}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="helper", messages=[*earlier, *_user("hi")], max_tokens=5)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "exceeds_budget"
    assert t.get("/v1/runs") == []
    # The last message alone fits the budget.
    assert client.chat.completions.create(model="helper", messages=_user("hi"), max_tokens=5).choices


def test_a_name_follows_renames_and_deletions(server: Server) -> None:
    t = server.tenant("alpha")
    first = t.agent("helper", instructions="one")
    client = t.client()
    assert client.chat.completions.create(model="helper", messages=_user("hi")).usage.prompt_tokens == 2  # type: ignore[union-attr]
    r = server.http.patch(f"/v1/agents/{first}", json={"name": "renamed"}, headers=t.h)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="helper", messages=_user("hi"))
    t.agent("helper", instructions="two words")
    done = client.chat.completions.create(model="helper", messages=_user("hi"))
    assert done.usage is not None and done.usage.prompt_tokens == 3  # the new agent's instructions
    assert client.chat.completions.create(model="renamed", messages=_user("hi")).choices
    assert server.http.delete(f"/v1/agents/{first}", headers=t.h).status_code == 204
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="renamed", messages=_user("hi"))
