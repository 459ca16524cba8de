"""Conversation threads over the HTTP API: a thread's history reaches the model and counts in
the run's token reservation; a successful run appends its two messages, a failed one
nothing; the plan's cap keeps the newest; deleting a thread deletes its messages; another
tenant's thread answers exactly like a missing one; the creates are idempotent.

The simulated model counts every word it is sent as an input token, so a run's
``input_tokens`` says exactly what history reached the model.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.runtime import Runtime
from tests.conftest import Deployment, TenantHandle, count_tenant_rows


def thread(t: TenantHandle, **body: Any) -> str:
    r = t.client.post("/v1/threads", json=body, headers=t.h)
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"/v1/threads/{r.json()['id']}"
    return str(r.json()["id"])


def run_on(t: TenantHandle, thread_id: str, agent_id: str, text: str, **kw: Any) -> Any:
    body = {"agent_id": agent_id, "input": text, **kw}
    return t.client.post(f"/v1/threads/{thread_id}/runs", json=body, headers=t.h)


def messages(t: TenantHandle, thread_id: str) -> list[tuple[str, str]]:
    r = t.client.get(f"/v1/threads/{thread_id}/messages", headers=t.h)
    assert r.status_code == 200, r.text
    return [(m["role"], m["content"]) for m in r.json()]


def test_the_history_reaches_the_model_and_the_run_appends_its_messages(make_tenant: Any) -> None:
    a = make_tenant("alpha")
    agent = a.agent(instructions="be brief")
    th = thread(a, metadata={"customer": "c-17"})

    first = run_on(a, th, agent, "alpha beta gamma", output_tokens=5)
    assert first.status_code == 200, first.text
    body = first.json()
    reply = body["run"]["output"]
    assert body["thread_id"] == th and body["run"]["status"] == "succeeded"
    assert [(m["role"], m["content"], m["run_id"]) for m in body["messages"]] == [
        ("user", "alpha beta gamma", body["run"]["id"]),
        ("assistant", reply, body["run"]["id"]),
    ]
    second = run_on(a, th, agent, "delta", output_tokens=4).json()
    # The same input on a fresh thread: the difference is the history, word for word.
    alone = run_on(a, thread(a), agent, "delta", output_tokens=4).json()
    assert second["run"]["input_tokens"] == alone["run"]["input_tokens"] + 3 + 5
    assert first.json()["run"]["input_tokens"] == alone["run"]["input_tokens"] - 1 + 3

    assert messages(a, th) == [
        ("user", "alpha beta gamma"),
        ("assistant", reply),
        ("user", "delta"),
        ("assistant", second["run"]["output"]),
    ]
    got = a.client.get(f"/v1/threads/{th}", headers=a.h).json()
    assert (got["metadata"], got["messages"]) == ({"customer": "c-17"}, 4)
    # The runs are ordinary runs: listed, audited, metered.
    assert a.client.get(f"/v1/runs/{second['run']['id']}", headers=a.h).json()["status"] == "succeeded"
    actions = [e["action"] for e in a.client.get("/v1/audit", headers=a.h).json()]
    assert "thread.create" in actions


def test_another_tenants_thread_answers_like_a_missing_one(make_tenant: Any) -> None:
    a, b = make_tenant("alpha"), make_tenant("beta")
    agent_a, agent_b = a.agent(), b.agent()
    th = thread(a)
    assert run_on(a, th, agent_a, "private words").status_code == 200

    def answers(path: str, method: str = "GET", **kw: Any) -> list[tuple[int, Any]]:
        return [
            (r.status_code, r.json()["error"]["code"])
            for r in (
                b.client.request(method, path.format(id=th), headers=b.h, **kw),
                b.client.request(method, path.format(id="th_never_issued"), headers=b.h, **kw),
            )
        ]

    for path, method, kw in (
        ("/v1/threads/{id}", "GET", {}),
        ("/v1/threads/{id}/messages", "GET", {}),
        ("/v1/threads/{id}", "DELETE", {}),
        ("/v1/threads/{id}/runs", "POST", {"json": {"agent_id": agent_b, "input": "hi"}}),
    ):
        foreign, missing = answers(path, method, **kw)
        assert foreign == missing == (404, "not_found"), (path, method)
    assert b.client.get("/v1/threads", headers=b.h).json() == []
    # A's thread is whole.
    assert len(messages(a, th)) == 2
    # Nor can A run B's agent on A's thread.
    assert run_on(a, th, agent_b, "hi").status_code == 404
    assert len(messages(a, th)) == 2


def test_deleting_a_thread_deletes_its_messages(make_tenant: Any, deployment: Deployment) -> None:
    a = make_tenant("alpha")
    agent = a.agent()
    kept, gone = thread(a), thread(a)
    for th in (kept, gone, gone):
        assert run_on(a, th, agent, "hello").status_code == 200
    assert a.client.delete(f"/v1/threads/{gone}", headers=a.h).status_code == 204
    assert a.client.get(f"/v1/threads/{gone}", headers=a.h).status_code == 404
    assert a.client.get(f"/v1/threads/{gone}/messages", headers=a.h).status_code == 404
    assert a.client.delete(f"/v1/threads/{gone}", headers=a.h).status_code == 404
    rows = count_tenant_rows(deployment, a.id)
    assert sum(n for table, n in rows.items() if table.endswith("thread_messages")) == 2
    assert sum(n for table, n in rows.items() if table.endswith("threads")) == 1
    assert len(messages(a, kept)) == 2


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_the_plans_cap_keeps_the_newest_messages_and_bounds_the_history(make_tenant: Any) -> None:
    a = make_tenant("alpha", "free", {"max_thread_messages": 4})
    agent = a.agent(instructions="be brief")
    th = thread(a)
    for word in ("one", "two", "three"):
        r = run_on(a, th, agent, word, output_tokens=2)
        assert r.status_code == 200, r.text
    kept = messages(a, th)
    assert [text for role, text in kept if role == "user"] == ["two", "three"]
    assert len(kept) == 4
    # The next run is sent the four kept messages (1 + 2 + 1 + 2 words), not all six.
    alone = run_on(a, thread(a), agent, "four", output_tokens=2).json()
    nxt = run_on(a, th, agent, "four", output_tokens=2).json()
    assert nxt["run"]["input_tokens"] == alone["run"]["input_tokens"] + 6
    page = a.client.get(f"/v1/threads/{th}/messages", headers=a.h).json()
    assert [m["position"] for m in page] == [5, 6, 7, 8]


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_the_history_counts_in_the_runs_token_reservation(make_tenant: Any) -> None:
    a = make_tenant("alpha", "free", {"tokens_per_day": 45})
    agent = a.agent(instructions="be brief")
    th = thread(a)
    ten = " ".join(["word"] * 10)
    assert run_on(a, th, agent, ten, output_tokens=30).status_code == 200  # worst case 2 + 10 + 30
    # Without its history the next run's worst case is 2 + 10 + 10 = 22, within the daily
    # budget; with it, 2 + 40 + 10 + 10 = 62: more than the whole budget.
    refused = run_on(a, th, agent, ten, output_tokens=10)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "exceeds_budget"
    assert len(messages(a, th)) == 2


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_a_failed_run_appends_nothing(make_tenant: Any) -> None:
    a = make_tenant("alpha")
    agent = a.agent(tools=["calculator"])
    th = thread(a)
    assert run_on(a, th, agent, "hello").status_code == 200
    # A tool the agent does not have: the model insists, pydantic-ai gives up, the run fails.
    failed = run_on(a, th, agent, '/call no_such_tool {"x": 1}')
    assert failed.status_code == 502, failed.text
    assert failed.json()["error"]["code"] == "run_failed"
    run_id = failed.json()["error"]["details"]["run_id"]
    assert a.client.get(f"/v1/runs/{run_id}", headers=a.h).json()["status"] == "failed"
    assert [role for role, _ in messages(a, th)] == ["user", "assistant"]


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_an_idempotent_retry_runs_once_and_answers_the_first_response(make_tenant: Any) -> None:
    a = make_tenant("alpha")
    agent = a.agent()
    h = {**a.h, "Idempotency-Key": "create-1"}
    first = a.client.post("/v1/threads", json={"metadata": {"k": "v"}}, headers=h)
    again = a.client.post("/v1/threads", json={"metadata": {"k": "v"}}, headers=h)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert len(a.client.get("/v1/threads", headers=a.h).json()) == 1
    other = a.client.post("/v1/threads", json={"metadata": {"k": "w"}}, headers=h)
    assert (other.status_code, other.json()["error"]["code"]) == (422, "idempotency_key_reused")

    th = first.json()["id"]
    h = {**a.h, "Idempotency-Key": "run-1"}
    body = {"agent_id": agent, "input": "once only"}
    r1 = a.client.post(f"/v1/threads/{th}/runs", json=body, headers=h)
    r2 = a.client.post(f"/v1/threads/{th}/runs", json=body, headers=h)
    assert (r1.status_code, r2.status_code) == (200, 200)
    assert r2.json() == r1.json() and r2.headers["Idempotent-Replayed"] == "true"
    assert len(messages(a, th)) == 2
    assert len(a.client.get("/v1/runs", headers=a.h).json()) == 1


@pytest.mark.only_deployments("sqlite-pool")
def test_lists_are_paged_with_a_link_to_the_next_page(make_tenant: Any) -> None:
    a = make_tenant("alpha")
    agent = a.agent()
    made = [thread(a) for _ in range(3)]
    first = a.client.get("/v1/threads?limit=2", headers=a.h)
    assert [t["id"] for t in first.json()] == made[::-1][:2]
    nxt = first.headers["Link"].split(">")[0].lstrip("<")
    second = a.client.get(nxt, headers=a.h)
    assert [t["id"] for t in second.json()] == made[:1] and "Link" not in second.headers

    th = made[0]
    for word in ("one", "two"):
        run_on(a, th, agent, word)
    page = a.client.get(f"/v1/threads/{th}/messages?limit=3", headers=a.h)
    assert [m["content"] for m in page.json()][0::2] == ["one", "two"]
    rest = a.client.get(page.headers["Link"].split(">")[0].lstrip("<"), headers=a.h)
    assert [m["role"] for m in rest.json()] == ["assistant"] and "Link" not in rest.headers


@pytest.mark.only_deployments("sqlite-pool")
@pytest.mark.parametrize(
    "body",
    [
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        {"metadata": {"": "v"}},
        {"metadata": {"k": "v" * 513}},
        {"metadata": {"k": 1}},
        {"metadata": {}, "other": 1},
    ],
)
def test_bad_metadata_is_refused_and_creates_nothing(make_tenant: Any, body: dict[str, Any]) -> None:
    a = make_tenant("alpha")
    r = a.client.post("/v1/threads", json=body, headers=a.h)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
    assert a.client.get("/v1/threads", headers=a.h).json() == []


@pytest.mark.only_deployments("sqlite-pool")
def test_a_read_key_reads_threads_but_cannot_write_them(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    a = make_tenant("alpha")
    agent = a.agent()
    th = thread(a)
    r = client.post(
        f"/admin/tenants/{a.id}/keys",
        json={"name": "reader", "scopes": ["read"]},
        headers={"Authorization": f"Bearer {operator_key}"},
    )
    assert r.status_code == 201, r.text
    reader = {"Authorization": f"Bearer {r.json()['key']}"}
    assert client.get(f"/v1/threads/{th}", headers=reader).status_code == 200
    for method, path, body in (
        ("POST", "/v1/threads", {}),
        ("DELETE", f"/v1/threads/{th}", None),
        ("POST", f"/v1/threads/{th}/runs", {"agent_id": agent, "input": "hi"}),
    ):
        r = client.request(method, path, json=body, headers=reader)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), (method, path)


@pytest.mark.only_deployments("sqlite-pool")
def test_at_the_process_level_the_history_reaches_the_model_too(
    client: TestClient, runtime: Runtime, operator_key: str
) -> None:
    """Thread runs and OpenAI-style conversations of a ``process`` tenant: the earlier turns
    travel with the run to the tenant's execution process (before, a conversation there
    answered 400 ``unsupported_parameter``)."""
    assert runtime.process_executor is not None
    runtime.process_executor.hosts_pools = True  # as in a process that executes runs
    op = {"Authorization": f"Bearer {operator_key}"}
    r = client.post("/admin/tenants", json={"name": "proc", "isolation_level": "process"}, headers=op)
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    key = client.post(f"/admin/tenants/{tid}/keys", json={"name": "k"}, headers=op).json()["key"]
    h = {"Authorization": f"Bearer {key}"}
    r = client.post("/v1/agents", json={"name": "helper", "model": "simulated:instant"}, headers=h)
    agent = r.json()["id"]

    def on_thread(th: str, text: str) -> Any:
        r = client.post(
            f"/v1/threads/{th}/runs", json={"agent_id": agent, "input": text, "output_tokens": 5}, headers=h
        )
        assert r.status_code == 200, r.text
        return r.json()["run"]

    th = client.post("/v1/threads", json={}, headers=h).json()["id"]
    on_thread(th, "alpha beta gamma")
    second = on_thread(th, "delta")
    alone = on_thread(client.post("/v1/threads", json={}, headers=h).json()["id"], "delta")
    assert second["input_tokens"] == alone["input_tokens"] + 3 + 5

    def completion(messages: list[dict[str, str]]) -> Any:
        body = {"model": "helper", "messages": messages, "max_tokens": 5}
        r = client.post("/v1/chat/completions", json=body, headers=h)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    earlier = [{"role": "user", "content": "alpha beta gamma"}, {"role": "assistant", "content": "one two"}]
    assert (
        completion([*earlier, {"role": "user", "content": "delta"}])
        == completion([{"role": "user", "content": "delta"}]) + 3 + 2
    )


@pytest.mark.only_deployments("sqlite-pool")
def test_a_thread_needs_no_body(make_tenant: Any) -> None:
    a = make_tenant("alpha")
    r = a.client.post("/v1/threads", headers=a.h)
    assert r.status_code == 201, r.text
    assert (r.json()["metadata"], r.json()["messages"]) == ({}, 0)


@pytest.mark.only_deployments("sqlite-pool")
def test_a_tool_call_of_an_earlier_turn_is_not_made_again(make_tenant: Any) -> None:
    """The simulated model calls the tools of the run's own prompt: a ``/call`` line in the
    thread's history was served by its own run (before, every later run on the thread made
    that call again)."""
    a = make_tenant("alpha")
    agent = a.agent(tools=["memory_put", "memory_get"])
    th = thread(a)
    put = run_on(a, th, agent, '/call memory_put {"key": "k", "value": "first"}').json()["run"]
    assert put["tool_calls"] == 1
    a.client.put("/v1/memory/k", json={"value": "changed"}, headers=a.h)
    later = run_on(a, th, agent, "and now?").json()["run"]
    assert later["tool_calls"] == 0
    assert a.client.get("/v1/memory/k", headers=a.h).json()["value"] == "changed"
    got = run_on(a, th, agent, '/call memory_get {"key": "k"}').json()["run"]
    assert got["tool_calls"] == 1 and "changed" in got["output"]


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_the_plans_thread_limit_holds(make_tenant: Any) -> None:
    a = make_tenant("alpha", "free", {"max_threads": 2})
    first, _ = thread(a), thread(a)
    r = a.client.post("/v1/threads", json={}, headers=a.h)
    assert (r.status_code, r.json()["error"]["code"]) == (429, "quota_exceeded")
    assert r.json()["error"]["details"]["quota"] == "max_threads"
    assert len(a.client.get("/v1/threads", headers=a.h).json()) == 2
    assert a.client.delete(f"/v1/threads/{first}", headers=a.h).status_code == 204
    thread(a)


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_a_thread_run_during_a_level_change_answers_like_an_agent_run(
    make_tenant: Any, runtime: Runtime
) -> None:
    """While the tenant changes isolation level, ``POST /v1/threads/{id}/runs`` goes on to
    admission as ``POST /v1/agents/{id}/runs`` does (it was refused at the HTTP boundary):
    a synchronous run answers 503 ``tenant_moving`` from there, with the agent's rate-limit
    state, and nothing is appended; during a storage move both are refused at the boundary."""
    a = make_tenant("alpha")
    agent = a.agent()
    th = thread(a)
    runtime.backend.update_tenant(a.id, {"moving_to": "process"})
    by_agent = a.run(agent, "now")
    on_thread = run_on(a, th, agent, "now")
    for r in (by_agent, on_thread):
        assert (r.status_code, r.json()["error"]["code"]) == (503, "tenant_moving"), r.text
        assert "changing isolation level" in r.json()["error"]["message"]
        assert r.headers["Retry-After"] == "2"
        assert '"agent";q=' in r.headers["RateLimit-Policy"]  # it reached admission
    assert messages(a, th) == []

    runtime.backend.update_tenant(a.id, {"moving_to": "silo"})  # a storage move: held at the boundary
    for r in (a.run(agent, "now"), run_on(a, th, agent, "now")):
        assert (r.status_code, r.json()["error"]["code"]) == (503, "tenant_moving"), r.text
        assert '"agent"' not in r.headers.get("RateLimit-Policy", "")

    runtime.backend.update_tenant(a.id, {"moving_to": None})
    r = run_on(a, th, agent, "now")
    assert r.status_code == 200, r.text
    assert [role for role, _ in messages(a, th)] == ["user", "assistant"]
