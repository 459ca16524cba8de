"""``Idempotency-Key`` on the POSTs that create something (runs, agents, keys), after
draft-ietf-httpapi-idempotency-key-header.

Before, the header was ignored: two POSTs of one run made two runs, each counted against
the tenant's rates and quotas.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import TenantHandle, auth

SLOW = "simulated:ttft_ms=0,tpot_ms=100"


def post_run(t: TenantHandle, agent: str, key: str | None, **body: Any) -> httpx.Response:
    headers = {**t.h, **({"Idempotency-Key": key} if key is not None else {})}
    return t.client.post(f"/v1/agents/{agent}/runs", json={"input": "hello", **body}, headers=headers)


def run_ids(client: TestClient, t: TenantHandle) -> list[str]:
    return [r["id"] for r in client.get("/v1/runs", headers=t.h).json()]


def test_a_retry_with_the_same_key_answers_the_first_response_and_runs_nothing(
    client: TestClient, make_tenant: Any
) -> None:
    a = make_tenant("alpha")
    agent = a.agent()
    first = post_run(a, agent, "order-1", mode="async")
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = post_run(a, agent, "order-1", mode="async")
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
    assert run_ids(client, a) == [first.json()["id"]]

    # A synchronous run: the finished run again.
    sync = post_run(a, agent, "order-2", output_tokens=3)
    replay = post_run(a, agent, "order-2", output_tokens=3)
    assert sync.status_code == replay.status_code == 200
    assert replay.json() == sync.json() and sync.json()["status"] == "succeeded"
    assert len(run_ids(client, a)) == 2

    # Without a key, the same body runs again.
    assert post_run(a, agent, None, output_tokens=3).status_code == 200
    assert len(run_ids(client, a)) == 3


def test_the_same_key_with_another_body_is_refused_and_runs_nothing(
    client: TestClient, make_tenant: Any
) -> None:
    a = make_tenant("alpha")
    agent = a.agent()
    assert post_run(a, agent, "k", mode="async").status_code == 202
    other = post_run(a, agent, "k", mode="async", input="something else")
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    # Another route with the same key is another request too.
    agent_b = a.agent("b")
    elsewhere = post_run(a, agent_b, "k", mode="async")
    assert elsewhere.status_code == 422
    assert len(run_ids(client, a)) == 1


@pytest.mark.parametrize("key", ["", " ", "x" * 256])
def test_an_empty_or_overlong_key_is_a_400(client: TestClient, make_tenant: Any, key: str) -> None:
    a = make_tenant("alpha")
    agent = a.agent()
    r = post_run(a, agent, key, mode="async")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"
    assert run_ids(client, a) == []
    assert post_run(a, agent, "x" * 255, mode="async").status_code == 202


def test_agents_and_keys_take_a_key_too(client: TestClient, make_tenant: Any, operator_key: str) -> None:
    a = make_tenant("alpha")
    body = {"name": "helper", "model": "simulated:instant"}
    h = {**a.h, "Idempotency-Key": "agent-1"}
    first = client.post("/v1/agents", json=body, headers=h)
    again = client.post("/v1/agents", json=body, headers=h)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    # Without the key the same body is a second create: refused, the name is taken.
    assert client.post("/v1/agents", json=body, headers=a.h).status_code == 409
    # A refused create gives its key back: the retry is tried anew.
    taken = {**a.h, "Idempotency-Key": "agent-2"}
    assert client.post("/v1/agents", json=body, headers=taken).status_code == 409
    assert client.post("/v1/agents", json=body, headers=taken).json()["error"]["code"] == "already_exists"

    op = {**auth(operator_key), "Idempotency-Key": "key-1"}
    k1 = client.post(f"/admin/tenants/{a.id}/keys", json={"name": "ci"}, headers=op)
    k2 = client.post(f"/admin/tenants/{a.id}/keys", json={"name": "ci"}, headers=op)
    assert k1.status_code == k2.status_code == 201 and k1.json() == k2.json()
    keys = client.get(f"/admin/tenants/{a.id}/keys", headers=auth(operator_key)).json()
    assert [k["name"] for k in keys].count("ci") == 1


def test_keys_are_per_tenant(client: TestClient, make_tenant: Any) -> None:
    a, b = make_tenant("alpha"), make_tenant("beta")
    ra = post_run(a, a.agent(), "shared", mode="async")
    rb = post_run(b, b.agent(), "shared", mode="async")
    assert ra.status_code == rb.status_code == 202
    assert "idempotent-replayed" not in rb.headers and rb.json()["id"] != ra.json()["id"]
    # B cannot replay A's request either: B's key answers B's own run.
    assert post_run(b, b.agent("b2"), "shared", mode="async").status_code == 422
    assert run_ids(client, b) == [rb.json()["id"]] and run_ids(client, a) == [ra.json()["id"]]


def test_a_replay_counts_against_no_rate_limit_or_quota(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"requests_per_minute": 6, "runs_per_day": 1})
    agent = a.agent()  # request 1 (and 1 more for the tenant's key creation: admin, not counted)
    first = post_run(a, agent, "once", mode="async")  # request 2, the day's one run
    assert first.status_code == 202
    for _ in range(8):  # more than the rate and the quota allow
        r = post_run(a, agent, "once", mode="async")
        assert r.status_code == 202 and r.headers["idempotent-replayed"] == "true"
    assert run_ids(client, a) == [first.json()["id"]]  # request 3
    # The rate still has room for the requests it counted: 3 used of 6.
    for _ in range(3):
        assert client.get("/v1/me", headers=a.h).status_code == 200
    assert client.get("/v1/me", headers=a.h).status_code == 429
    # A new key is a new request: counted, and refused.
    assert post_run(a, agent, "twice", mode="async").status_code == 429


def test_a_retry_while_the_first_request_runs_is_a_409(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha")
    agent = a.agent(model=SLOW)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post_run, a, agent, "long", output_tokens=20)
        while not any(r["status"] == "running" for r in client.get("/v1/runs", headers=a.h).json()):
            assert not slow.done(), slow.result().text
        busy = post_run(a, agent, "long", output_tokens=20)
        first = slow.result()
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "idempotency_in_progress"
    assert first.status_code == 200
    after = post_run(a, agent, "long", output_tokens=20)
    assert after.status_code == 200 and after.json() == first.json()
    assert len(run_ids(client, a)) == 1


def test_parallel_requests_with_one_key_create_one_run(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", "pro")
    agent = a.agent()
    n = 8
    start = threading.Barrier(n)

    def send() -> httpx.Response:
        start.wait()
        return post_run(a, agent, "burst", mode="async")

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda _: send(), range(n)))
    created = [r for r in answers if r.status_code == 202 and "idempotent-replayed" not in r.headers]
    assert len(created) == 1, [r.text for r in answers]
    for r in answers:
        assert (r.status_code == 202 and r.json() == created[0].json()) or (
            r.status_code == 409 and r.json()["error"]["code"] == "idempotency_in_progress"
        ), r.text
    assert run_ids(client, a) == [created[0].json()["id"]]
