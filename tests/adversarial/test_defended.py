"""Attacks that were properly defended, adding coverage beyond tests/api/."""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import auth


def test_memory_prefix_wildcards_are_literal(client: TestClient, make_tenant: Any) -> None:
    """Attack: ``GET /v1/memory?prefix=%`` / ``prefix=_`` hoping the prefix reaches SQL LIKE
    unescaped and lists every key. Defended: ``startswith(..., autoescape=True)``."""
    a = make_tenant("alpha")
    for k in ("abc", "a_c", "zz"):
        client.put(f"/v1/memory/{k}", json={"value": "1"}, headers=a.h)
    assert client.get("/v1/memory?prefix=%25", headers=a.h).json() == []
    assert client.get("/v1/memory?prefix=_", headers=a.h).json() == []
    assert client.get("/v1/memory?prefix=a_", headers=a.h).json() == ["a_c"]


def test_one_tenants_concurrency_cap_does_not_block_a_neighbour(client: TestClient, make_tenant: Any) -> None:
    """Attack (noisy neighbour): tenant A fills its concurrency slot and queues more slow
    async runs; they wait in the queue (never more than A's cap run at once) while tenant B
    still runs at once."""
    a = make_tenant("alpha", limits={"max_concurrent_runs": 1, "requests_per_minute": 100_000})
    b = make_tenant("beta", limits={"max_concurrent_runs": 1})
    slow = a.agent("slow", model="simulated:ttft_ms=300,tpot_ms=0")
    ids = [a.run(slow, "x", output_tokens=1, mode="async").json()["id"] for _ in range(3)]
    assert b.run(b.agent("fast"), "x", output_tokens=1).status_code == 200
    assert client.get("/v1/usage", headers=b.h).json()["runs_in_flight"] == 0
    for _ in range(2000):
        assert client.get("/v1/usage", headers=a.h).json()["runs_in_flight"] <= 1
        statuses = [client.get(f"/v1/runs/{i}", headers=a.h).json()["status"] for i in ids]
        if all(st == "succeeded" for st in statuses):
            break
        time.sleep(0.01)
    assert statuses == ["succeeded"] * 3


def test_one_tenants_spent_budget_does_not_refuse_a_neighbour(client: TestClient, make_tenant: Any) -> None:
    """Attack: exhaust tenant A's daily token budget; tenant B (same plan) is unaffected and
    its usage shows none of A's tokens."""
    a = make_tenant("alpha", limits={"tokens_per_day": 40})
    b = make_tenant("beta", limits={"tokens_per_day": 40})
    ag = a.agent("x")
    assert a.run(ag, "x", output_tokens=30).status_code == 200
    assert a.run(ag, "x", output_tokens=30).status_code == 429
    assert b.run(b.agent("y"), "x", output_tokens=30).status_code == 200
    assert client.get("/v1/usage", headers=b.h).json()["tokens_today"] == 31


def test_interleaved_async_runs_of_two_tenants_write_only_their_own_memory(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: two tenants' async runs interleave on the same event loop (and the memory tools
    hop to worker threads); a context leak between tasks/threads would put one tenant's
    write into the other's memory."""
    a = make_tenant("alpha")
    b = make_tenant("beta")
    model = "simulated:ttft_ms=30,tpot_ms=0"
    ag_a = a.agent("w", model=model, tools=["memory_put"])
    ag_b = b.agent("w", model=model, tools=["memory_put"])
    ids = []
    for i in range(4):
        ids.append(
            (a, a.run(ag_a, f'/call memory_put {{"key": "a{i}", "value": "A"}}', mode="async").json()["id"])
        )
        ids.append(
            (b, b.run(ag_b, f'/call memory_put {{"key": "b{i}", "value": "B"}}', mode="async").json()["id"])
        )
    for t, rid in ids:
        for _ in range(300):
            if client.get(f"/v1/runs/{rid}", headers=t.h).json()["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.01)
    assert client.get("/v1/memory", headers=a.h).json() == [f"a{i}" for i in range(4)]
    assert client.get("/v1/memory", headers=b.h).json() == [f"b{i}" for i in range(4)]


def test_spliced_and_mangled_keys_are_refused(client: TestClient, make_tenant: Any) -> None:
    """Attack: splice tenant A's key prefix with tenant B's secret, truncate or extend a key,
    change its case, or send it under another auth scheme. All answer 401 alike."""
    a = make_tenant("alpha")
    b = make_tenant("beta")
    _, a_prefix, _ = a.key.split("_", 2)
    _, _, b_secret = b.key.split("_", 2)
    for token in (
        f"ptx_{a_prefix}_{b_secret}",
        a.key[:-1],
        a.key + "x",
        a.key + "_x",
        a.key.upper(),
        "ptx_" + a_prefix,
        f"ptx_{a_prefix}_",
    ):
        r = client.get("/v1/me", headers=auth(token))
        assert r.status_code == 401, token
        assert r.json()["error"] == {"code": "unauthenticated", "message": "invalid API key", "details": {}}
    for header in (f"Basic {a.key}", a.key, f"Token {a.key}"):
        assert client.get("/v1/me", headers={"Authorization": header}).status_code == 401


def test_old_key_stays_dead_after_a_same_name_tenant_is_recreated(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    """Attack: keep tenant A's key, have A deleted and a new tenant created with the same
    name; the old key must not start working for the new tenant, and the new tenant's
    audit/usage show nothing of the old one."""
    a = make_tenant("alpha")
    a.run(a.agent("x"), "hello")
    assert client.delete(f"/admin/tenants/{a.id}", headers=auth(operator_key)).status_code == 200
    a2 = make_tenant("alpha")
    assert client.get("/v1/me", headers=a.h).status_code == 401
    assert all(x["tenant_id"] == a2.id for x in client.get("/v1/audit", headers=a2.h).json())
    assert client.get("/v1/usage", headers=a2.h).json()["tokens_today"] == 0


def test_run_filter_by_foreign_agent_answers_like_a_missing_agent(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: ``GET /v1/runs?agent_id=<B's agent>`` hoping the filter is applied without the
    tenant predicate."""
    a = make_tenant("alpha")
    b = make_tenant("beta")
    ag = a.agent("x")
    a.run(ag, "secret prompt")
    assert client.get(f"/v1/runs?agent_id={ag}", headers=b.h).json() == []
    assert client.get("/v1/runs?agent_id=ag_missing", headers=b.h).json() == []


def test_concurrent_runs_never_exceed_the_cap_under_a_barrier(client: TestClient, make_tenant: Any) -> None:
    """Attack: 8 synchronous run requests released together against ``max_concurrent_runs=3``;
    exactly 3 are admitted (the slot check-and-take is atomic)."""
    a = make_tenant("alpha", limits={"max_concurrent_runs": 3})
    agent = a.agent("slow", model="simulated:ttft_ms=400,tpot_ms=0")
    codes: list[int] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        codes.append(a.run(agent, "x", output_tokens=1).status_code)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * 3 + [429] * 5
