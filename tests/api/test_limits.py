"""Rate, concurrency and token-budget limits answer 429 with Retry-After."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.control import RunService
from patinox.errors import TenantMoving
from patinox.isolation import NamespaceExecutor
from patinox.limits import TokenBudget
from patinox.runtime import Runtime
from patinox.storage._crypto.aead import BLOB_OVERHEAD
from tests.conftest import TenantHandle


def test_rate_limit_429_with_retry_after(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"requests_per_minute": 5})
    b = make_tenant("beta", limits={"requests_per_minute": 5})
    codes = [client.get("/v1/agents", headers=a.h).status_code for _ in range(7)]
    assert codes == [200] * 5 + [429] * 2
    r = client.get("/v1/agents", headers=a.h)
    assert r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.json()["error"]["details"]["limit"] == 5
    # The neighbour is not affected.
    assert client.get("/v1/agents", headers=b.h).status_code == 200


def test_concurrency_limit_429(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"max_concurrent_runs": 2})
    agent = a.agent("slow", model="simulated:ttft_ms=400,tpot_ms=0")
    results: list[int] = []
    barrier = threading.Barrier(4)

    def go() -> None:
        barrier.wait()
        results.append(a.run(agent, "x", output_tokens=1).status_code)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200, 429, 429]
    # Slots come back after the runs end.
    assert a.run(agent, "x", output_tokens=1).status_code == 200


def test_concurrency_429_has_retry_after(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"max_concurrent_runs": 1})
    agent = a.agent("slow", model="simulated:ttft_ms=300,tpot_ms=0")
    started = threading.Event()
    out: dict[str, Any] = {}

    def first() -> None:
        started.set()
        out["first"] = a.run(agent, "x", output_tokens=1)

    t = threading.Thread(target=first)
    t.start()
    started.wait()
    # Poll until the first run holds the slot, then the second must be refused.
    for _ in range(200):
        r = client.get("/v1/usage", headers=a.h)
        if r.json()["runs_in_flight"] == 1:
            break
    second = a.run(agent, "x", output_tokens=1)
    t.join()
    assert out["first"].status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "concurrency_limited"
    assert int(second.headers["Retry-After"]) >= 1


def test_token_budget_stops_runs_once_spent(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"tokens_per_day": 100})
    agent = a.agent("x")
    # Each run: 5 input words + 20 output tokens = 25 tokens.
    ok = [a.run(agent, "one two three four five", output_tokens=20) for _ in range(4)]
    assert [r.status_code for r in ok] == [200] * 4
    assert sum(r.json()["input_tokens"] + r.json()["output_tokens"] for r in ok) == 100
    r = a.run(agent, "one two three four five", output_tokens=20)
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["code"] == "quota_exceeded"
    assert err["details"]["limit"] == 100 and err["details"]["used"] == 100
    assert "Retry-After" in r.headers
    # Refused before any model call: no run, no usage recorded for it.
    assert len(client.get("/v1/runs", headers=a.h).json()) == 4
    usage = client.get("/v1/usage", headers=a.h).json()
    assert usage["tokens_today"] == 100 and len(usage["records"]) == 4


def test_reservation_refuses_a_run_that_could_pass_the_budget(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"tokens_per_day": 50})
    agent = a.agent("x")
    assert a.run(agent, "hello", output_tokens=30).status_code == 200  # 31 spent, 19 left
    r = a.run(agent, "hello", output_tokens=20)  # worst case 21
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert a.run(agent, "hello", output_tokens=10).status_code == 200


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_run_larger_than_the_whole_daily_budget_is_refused_for_good(
    client: TestClient, make_tenant: Any, mode: str
) -> None:
    """A run whose worst case exceeds the whole ``tokens_per_day`` was answered ``429``
    with a ``Retry-After`` of many hours, though no day can ever admit it. It is
    ``422 exceeds_budget`` with the limit and the run's worst case, no ``Retry-After``, and
    nothing is written: no run, no reservation, no run counted against ``runs_per_day``."""
    a = make_tenant("alpha", limits={"tokens_per_day": 100, "runs_per_day": 1})
    agent = a.agent("x")
    # With no output_tokens the plan's 2,048 per run is reserved; 1 word of prompt.
    for kw, worst_case in (({}, 2049), ({"output_tokens": 100}, 101)):
        r = a.run(agent, "hello", mode=mode, **kw)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "exceeds_budget", err
        assert {k: err["details"][k] for k in ("quota", "limit", "requested")} == {
            "quota": "tokens_per_day",
            "limit": 100,
            "requested": worst_case,
        }
        assert "Retry-After" not in r.headers
    assert client.get("/v1/runs", headers=a.h).json() == []
    usage = client.get("/v1/usage", headers=a.h).json()
    assert (usage["tokens_today"], usage["tokens_reserved"], usage["runs_in_flight"]) == (0, 0, 0)
    r = a.run(agent, "hello", mode=mode, output_tokens=99)  # worst case 100: the whole budget
    assert r.status_code == (200 if mode == "sync" else 202), r.text


@pytest.mark.only_deployments("sqlite-pool")
def test_retry_after_is_whole_seconds_rounded_up(runtime: Runtime, operator_key: str) -> None:
    """The token budget's ``Retry-After`` was rounded down: at 23:59:58.7 it said 1 s and a
    retry then was refused again; so was any fractional ``retry_after_s`` on its way to
    the header. Both round up."""
    clock = [datetime(2026, 1, 1, 23, 59, 58, 700_000, tzinfo=UTC)]
    budget = TokenBudget(runtime.backend, clock=lambda: clock[0])
    runs = RunService(runtime.backend, NamespaceExecutor(), queue=runtime.queue, budget=budget)
    app = create_app(runtime=dataclasses.replace(runtime, runs=runs, budget=budget))

    def moving() -> None:
        raise TenantMoving("moving", tenant_id="tn_x", retry_after_s=0.2)

    app.add_api_route("/probe/moving", moving)
    with TestClient(app, raise_server_exceptions=False) as client:
        a = TenantHandle(client, operator_key, "alpha", limits={"tokens_per_day": 20})
        agent = a.agent("x")
        assert a.run(agent, "hello", output_tokens=19).status_code == 200
        r = a.run(agent, "hello", output_tokens=1)
        assert r.status_code == 429 and r.headers["Retry-After"] == "2", r.headers
        assert r.json()["error"]["details"]["retry_after_s"] == 2
        r = client.get("/probe/moving")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.headers


def test_output_tokens_above_plan_is_refused(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"max_output_tokens_per_run": 10})
    agent = a.agent("x")
    r = a.run(agent, "hi", output_tokens=11)
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "output_tokens"


def test_ratelimit_headers_on_success_and_refusal(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"requests_per_minute": 3})
    r = client.get("/v1/agents", headers=a.h)
    assert r.headers["RateLimit-Policy"] == '"tenant";q=3;w=60, "key";q=3;w=60'
    assert r.headers["RateLimit"].startswith('"tenant";r=2;t=')
    assert '"key";r=2;t=' in r.headers["RateLimit"]
    client.get("/v1/agents", headers=a.h)
    client.get("/v1/agents", headers=a.h)
    r = client.get("/v1/agents", headers=a.h)
    assert r.status_code == 429
    assert r.headers["RateLimit"].startswith('"tenant";r=0;t=')
    assert int(r.headers["Retry-After"]) >= 1


def test_writes_are_held_while_a_tenant_moves(client: TestClient, make_tenant: Any, runtime: Any) -> None:
    a = make_tenant("alpha")
    agent = a.agent("x")
    runtime.backend.update_tenant(a.id, {"moving_to": "silo"})
    assert client.get(f"/v1/agents/{agent}", headers=a.h).status_code == 200
    for method, path in (("POST", "/v1/agents"), ("PUT", "/v1/memory/k"), ("DELETE", f"/v1/agents/{agent}")):
        r = client.request(method, path, json={"name": "y", "value": "v"}, headers=a.h)
        assert r.status_code == 503, (method, r.text)
        assert r.json()["error"]["code"] == "tenant_moving"
        assert r.headers["Retry-After"] == "2"
    runtime.backend.update_tenant(a.id, {"moving_to": None})
    assert client.put("/v1/memory/k", json={"value": "v"}, headers=a.h).status_code == 200


def test_per_key_rate_limit_is_separate_from_the_tenants(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    from tests.conftest import auth

    a = make_tenant("alpha", limits={"requests_per_minute": 100, "key_requests_per_minute": 3})
    second = client.post(f"/admin/tenants/{a.id}/keys", json={"name": "k2"}, headers=auth(operator_key))
    h2 = auth(second.json()["key"])
    codes = [client.get("/v1/agents", headers=a.h).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = client.get("/v1/agents", headers=a.h)
    assert r.json()["error"]["details"]["policy"] == "key"
    assert client.get("/v1/agents", headers=h2).status_code == 200  # another key of the tenant
    assert 'key";q=3' in client.get("/v1/agents", headers=h2).headers["RateLimit-Policy"]


def test_per_agent_run_rate(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"agent_runs_per_minute": 2})
    one, two = a.agent("one"), a.agent("two")
    assert [a.run(one).status_code for _ in range(3)] == [200, 200, 429]
    assert a.run(two).status_code == 200


def test_per_agent_policy_joins_the_ratelimit_headers(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"agent_runs_per_minute": 2})
    agent = a.agent("one")
    ok = a.run(agent)
    assert ok.status_code == 200
    # One field each, naming the tenant's, the key's and the agent's policy.
    assert ok.headers.get_list("RateLimit-Policy") == [ok.headers["RateLimit-Policy"]]
    assert ok.headers["RateLimit-Policy"].endswith(', "agent";q=2;w=60')
    assert '"agent";r=1;t=' in ok.headers["RateLimit"]
    assert a.run(agent).status_code == 200
    refused = a.run(agent)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.json()["error"]["message"] == "agent rate limit of 2 runs per minute reached"
    assert refused.headers.get_list("RateLimit") == [refused.headers["RateLimit"]]
    assert refused.headers["RateLimit"].startswith('"tenant";r=')
    assert f'"agent";r=0;t={refused.headers["Retry-After"]}' in refused.headers["RateLimit"]


def test_runs_per_day_quota(client: TestClient, make_tenant: Any) -> None:
    a = make_tenant("alpha", limits={"runs_per_day": 3})
    agent = a.agent("x")
    assert [a.run(agent).status_code for _ in range(3)] == [200, 200, 200]
    r = a.run(agent, mode="async")
    assert r.status_code == 429 and r.json()["error"]["details"]["quota"] == "runs_per_day"
    assert len(client.get("/v1/runs", headers=a.h).json()) == 3


def test_memory_bytes_quota(client: TestClient, make_tenant: Any) -> None:
    """The quota counts stored bytes: each key's and value's UTF-8 bytes plus the blob
    overhead of the value's encryption, exactly; one byte more than fits is refused."""
    a = make_tenant(
        "alpha", limits={"memory_bytes": (1 + 200 + BLOB_OVERHEAD) + (1 + 300 + BLOB_OVERHEAD) - 1}
    )
    assert client.put("/v1/memory/a", json={"value": "x" * 200}, headers=a.h).status_code == 200
    r = client.put("/v1/memory/b", json={"value": "y" * 300}, headers=a.h)
    assert r.status_code == 429 and r.json()["error"]["details"]["quota"] == "memory_bytes"
    assert client.get("/v1/memory", headers=a.h).json() == ["a"]
    assert client.put("/v1/memory/b", json={"value": "y" * 299}, headers=a.h).status_code == 200
    # Replacing a value counts only the new size.
    assert client.put("/v1/memory/a", json={"value": "z" * 200}, headers=a.h).status_code == 200
    assert client.put("/v1/memory/a", json={"value": "z" * 201}, headers=a.h).status_code == 429


def test_memory_bytes_quota_holds_under_concurrent_writes(client: TestClient, make_tenant: Any) -> None:
    """Eight writers released together, each storing a value that fits alone: the stored
    total never passes the quota (the check and the write are one serialised step)."""
    a = make_tenant("alpha", limits={"memory_bytes": 1500, "requests_per_minute": 1000})
    barrier = threading.Barrier(8)
    codes: list[int] = []

    def put(i: int) -> None:
        barrier.wait()
        codes.append(client.put(f"/v1/memory/k{i}", json={"value": "v" * 300}, headers=a.h).status_code)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = len(client.get("/v1/memory", headers=a.h).json())
    assert codes.count(200) == stored and stored >= 1
    assert set(codes) <= {200, 429}
    # Each entry takes 2 + 300 + 33 bytes (key, value, blob overhead): at most 4 fit in 1,500.
    assert stored <= 4


def test_max_agents_quota(client: TestClient, make_tenant: Any) -> None:
    """A tenant at its ``max_agents`` is refused a new agent (429 ``quota_exceeded``,
    nothing written, no ``Retry-After``: it is no daily quota); deleting one makes room.
    The neighbour is not affected."""
    a = make_tenant("alpha", limits={"max_agents": 2})
    b = make_tenant("beta", limits={"max_agents": 2})
    first = a.agent("one")
    a.agent("two")
    r = client.post("/v1/agents", json={"name": "three"}, headers=a.h)
    assert r.status_code == 429, r.text
    assert "Retry-After" not in r.headers
    err = r.json()["error"]
    assert err["code"] == "quota_exceeded"
    assert {k: err["details"][k] for k in ("quota", "limit", "used", "requested")} == {
        "quota": "max_agents",
        "limit": 2,
        "used": 2,
        "requested": 1,
    }
    assert sorted(x["name"] for x in client.get("/v1/agents", headers=a.h).json()) == ["one", "two"]
    b.agent("one")
    assert client.delete(f"/v1/agents/{first}", headers=a.h).status_code == 204
    assert client.post("/v1/agents", json={"name": "three"}, headers=a.h).status_code == 201


def test_max_agents_quota_holds_under_concurrent_creates(client: TestClient, make_tenant: Any) -> None:
    """Eight creators released together: exactly ``max_agents`` agents exist after (the
    insert and the count are one serialised step), the others are refused."""
    a = make_tenant("alpha", limits={"max_agents": 3, "requests_per_minute": 1000})
    barrier = threading.Barrier(8)
    codes: list[int] = []

    def create(i: int) -> None:
        barrier.wait()
        codes.append(client.post("/v1/agents", json={"name": f"a{i}"}, headers=a.h).status_code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] * 3 + [429] * 5
    assert len(client.get("/v1/agents", headers=a.h).json()) == 3
