"""Adversarial findings: each test performs an attack and asserts the CORRECT behaviour.

Every test here failed against the build it was written for; each docstring describes
the attack and what a fixed build must do.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text

from patinox.api import Runtime
from tests.conftest import auth

_TENANT_TABLES = ("agents", "runs", "memory", "usage_records", "audit_log", "api_keys")


def _rows_of(runtime: Runtime, tenant_id: str) -> dict[str, int]:
    with runtime.backend.engine.connect() as conn:
        return {
            t: int(
                conn.execute(
                    text(f"SELECT count(*) FROM {t} WHERE tenant_id = :t"), {"t": tenant_id}
                ).scalar_one()
            )
            for t in _TENANT_TABLES
        }


def _wait_no_runs_in_flight(runtime: Runtime, tenant_id: str, deadline_s: float = 5.0) -> None:
    end = time.monotonic() + deadline_s
    while runtime.queue.held(tenant_id) and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(0.05)  # let the settling transaction finish


def _wait_in_flight(client: TestClient, h: dict[str, str], n: int) -> None:
    for _ in range(200):
        if client.get("/v1/usage", headers=h).json()["runs_in_flight"] >= n:
            return
        time.sleep(0.01)
    raise AssertionError("run never started")


# --- lifecycle races ----------------------------------------------------------------


def test_tenant_delete_during_an_async_run_leaves_no_rows_behind(
    client: TestClient, make_tenant: Any, operator_key: str, runtime: Runtime
) -> None:
    """Attack: start a slow async run whose agent writes memory, then have the operator delete
    the tenant while it is in flight. The purge runs first; the run then finishes and writes
    its memory row, its usage record and its audit record under the deleted tenant's id, so
    the "deleted" tenant's data (here a secret value) survives deletion for ever.

    Correct: after deletion and once the run is over, no row of the tenant exists (the
    run is cancelled by the delete, or its late writes are refused).
    """
    a = make_tenant("alpha")
    agent = a.agent("slow", model="simulated:ttft_ms=300,tpot_ms=0", tools=["memory_put"])
    r = a.run(
        agent,
        '/call memory_put {"key": "secret", "value": "late-write-marker"}',
        mode="async",
        output_tokens=3,
    )
    assert r.status_code == 202, r.text
    _wait_in_flight(client, a.h, 1)
    assert client.delete(f"/admin/tenants/{a.id}", headers=auth(operator_key)).status_code == 200
    _wait_no_runs_in_flight(runtime, a.id)
    assert _rows_of(runtime, a.id) == dict.fromkeys(_TENANT_TABLES, 0)


def test_suspend_during_an_async_run_stops_its_side_effects(
    client: TestClient, make_tenant: Any, operator_key: str, runtime: Runtime
) -> None:
    """Attack: start a slow async run that will call ``memory_put``, then the operator
    suspends the tenant. The run keeps going after suspension: it calls the tool, writes
    memory, consumes model tokens and is recorded as ``succeeded``, although a suspended
    tenant must have every call refused.

    Correct: once suspended, the run does not go on (it ends ``failed``) and its tool does
    not write.
    """
    a = make_tenant("alpha")
    agent = a.agent("slow", model="simulated:ttft_ms=300,tpot_ms=0", tools=["memory_put"])
    r = a.run(agent, '/call memory_put {"key": "after-suspend", "value": "v"}', mode="async", output_tokens=3)
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    _wait_in_flight(client, a.h, 1)
    op = auth(operator_key)
    assert client.post(f"/admin/tenants/{a.id}/suspend", headers=op).status_code == 200
    _wait_no_runs_in_flight(runtime, a.id)
    assert client.post(f"/admin/tenants/{a.id}/resume", headers=op).status_code == 200
    run = client.get(f"/v1/runs/{run_id}", headers=a.h).json()
    assert run["status"] == "failed", run
    assert client.get("/v1/memory/after-suspend", headers=a.h).status_code == 404


# --- limit bypasses -----------------------------------------------------------------


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
    _wait_in_flight(client, a.h, 1)
    r = client.patch(
        f"/admin/tenants/{a.id}", json={"limits": {"tokens_per_day": 1000}}, headers=auth(operator_key)
    )
    assert r.status_code == 200
    second = a.run(agent, "x", output_tokens=600, mode="async")
    _wait_no_runs_in_flight(runtime, a.id)
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
    _wait_in_flight(client, a.h, 1)
    r = client.patch(
        f"/admin/tenants/{a.id}", json={"limits": {"tokens_per_day": 1000}}, headers=auth(operator_key)
    )
    assert r.status_code == 200
    client.get("/v1/usage", headers=a.h)  # rebuilds the ledger while the run is in flight
    _wait_no_runs_in_flight(runtime, a.id)
    usage = client.get("/v1/usage", headers=a.h).json()
    recorded = sum(u["input_tokens"] + u["output_tokens"] for u in usage["records"])
    assert recorded == 101, usage
    assert usage["tokens_today"] == recorded, usage


# --- crashes on bad input -------------------------------------------------------------


def test_naive_or_out_of_range_since_is_a_client_error(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    """Attack: ``GET /v1/usage?since=2024-01-01T00:00:00`` (no time zone) or a date whose UTC
    value overflows (``9999-12-31T23:59:59-14:00``). The naive datetime reaches the UTC
    column type and fails there, answered ``503 storage_error`` (a server failure that
    invites retries and pages the operator); the same on ``/admin/usage``.

    Correct: a 4xx ``invalid_request`` (or naive read as UTC and 200), never a 5xx.
    """
    a = make_tenant("alpha")
    for since in ("2024-01-01T00:00:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00%2B14:00"):
        r = client.get(f"/v1/usage?since={since}", headers=a.h)
        assert r.status_code in (200, 422), (since, r.status_code, r.text)
        r = client.get(f"/admin/usage?since={since}", headers=auth(operator_key))
        assert r.status_code in (200, 422), (since, r.status_code, r.text)


def test_huge_after_seq_is_not_an_internal_error(
    client: TestClient, make_tenant: Any, operator_key: str
) -> None:
    """Attack: ``GET /v1/audit?after_seq=99999999999999999999`` (above SQLite's 64-bit INTEGER).
    sqlite3 raises ``OverflowError``, which ``translate_errors`` does not catch: a bare
    ``500 Internal Server Error`` (not even the JSON error shape). Same on ``/admin/audit``.

    Correct: 422 ``invalid_request`` (bound the query parameter) or 200 ``[]``.
    """
    a = make_tenant("alpha")
    for path, h in (("/v1/audit", a.h), ("/admin/audit", auth(operator_key))):
        r = client.get(f"{path}?after_seq=99999999999999999999", headers=h)
        assert r.status_code in (200, 422), (path, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")


def test_huge_max_tool_calls_is_refused_without_a_500(client: TestClient, make_tenant: Any) -> None:
    """Attack: ``POST /v1/agents {"max_tool_calls": 1e20}`` (and the same PATCH). The value
    is not bounded by the schema nor checked against the plan, and the SQLite insert
    overflows: ``500 Internal Server Error``.

    Correct: 422 ``invalid_request``; nothing is written.
    """
    a = make_tenant("alpha")
    agent = a.agent("x")
    r = client.post(
        "/v1/agents",
        json={"name": "big", "model": "simulated:instant", "max_tool_calls": 10**20},
        headers=a.h,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    r = client.patch(f"/v1/agents/{agent}", json={"max_tool_calls": 10**20}, headers=a.h)
    assert r.status_code == 422, r.text
    assert [x["name"] for x in client.get("/v1/agents", headers=a.h).json()] == ["x"]


def test_memory_tool_obeys_the_memory_key_rules(client: TestClient, make_tenant: Any) -> None:
    """Attack: the HTTP API refuses memory keys outside 1-200 characters (and the column is
    ``String(200)``), but the agent's ``memory_put`` tool stores any key: an empty key (not
    addressable or deletable through ``/v1/memory/{key}``) and a 500-character one.

    Correct: the tool refuses such keys (tool failure), so they never reach storage.
    """
    a = make_tenant("alpha")
    agent = a.agent("w", tools=["memory_put"])
    for key in ("", "k" * 500):
        a.run(agent, "/call memory_put " + json.dumps({"key": key, "value": "v"}), output_tokens=1)
    assert client.get("/v1/memory", headers=a.h).json() == []


def test_non_finite_limit_override_is_refused(client: TestClient, operator_key: str) -> None:
    """Attack (operator input): ``POST /admin/tenants {"limits": {"run_timeout_s": "Infinity"}}``
    is accepted (``gt=0`` lets infinity through); the tenant's limits then read ``null`` and
    every run of the tenant is refused with 422 ``timeout_s must be a finite number``.

    Correct: the override is refused at creation with 422 ``invalid_request``.
    """
    r = client.post(
        "/admin/tenants",
        json={"name": "gamma", "limits": {"run_timeout_s": "Infinity"}},
        headers=auth(operator_key),
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
