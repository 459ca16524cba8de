"""Adversarial findings, round 2 (queue/workers, quotas, transfer, keys, middleware).

Each test performs an attack and asserts the CORRECT behaviour; each failed against the
build it was written for. Docstrings describe the attack and what a fixed build must do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.api import Runtime, create_app
from tests.conftest import TenantHandle, auth


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


def test_queued_runs_obey_a_lowered_concurrency_cap(runtime: Runtime, operator_key: str) -> None:
    """Attack: a tenant queues 6 async runs while its ``max_concurrent_runs`` is 6 (or while
    on a bigger plan); the operator then lowers the cap to 1 (abuse, downgrade). Each
    ``run_queue`` row keeps the ``max_running`` it was enqueued with and ``claim()`` compares
    against that stale figure, so workers still run all 6 at once — the new cap is bypassed
    for every run queued before the change (up to runs_per_day of them).

    Correct: a claim checks the tenant's current cap; at most 1 run is claimed.
    """
    runtime.settings = dataclasses.replace(runtime.settings, embedded_workers=0)
    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as client:
        a = TenantHandle(client, operator_key, "alpha", "free", {"max_concurrent_runs": 6})
        agent = a.agent("x")
        for _ in range(6):
            assert a.run(agent, "hi", mode="async", output_tokens=1).status_code == 202
        r = client.patch(
            f"/admin/tenants/{a.id}", json={"limits": {"max_concurrent_runs": 1}}, headers=auth(operator_key)
        )
        assert r.status_code == 200, r.text
        claims = []
        for _ in range(6):
            c = runtime.queue.claim("test-worker")
            if c is not None:
                claims.append(c)
        assert len(claims) <= 1, f"{len(claims)} runs claimed at once under a cap of 1"


def test_cli_move_to_an_unknown_storage_model_is_a_clean_error(tmp_path: Any, monkeypatch: Any) -> None:
    """Attack: ``patinox tenants move acme --to nonsense`` (or ``--to SILO``). The value is
    passed straight to ``StorageModel(to)`` and the command dies with a ValueError
    traceback instead of the one-line ``error:`` every other CLI refusal gives.

    Correct: exit code 1 (or 2, usage error), no traceback, the valid choices named; a
    name in another case is simply accepted.
    """
    from tests.cli.conftest import cli

    for var in ("PATINOX_DATA_DIR", "PATINOX_DATABASE_URL", "PATINOX_OWNER_URL", "PATINOX_KEK_URL"):
        monkeypatch.delenv(var, raising=False)
    ddir = tmp_path / "d"
    assert cli("init", "--data-dir", str(ddir), "--key-file", str(tmp_path / "op.key")).exit_code == 0
    monkeypatch.setenv("PATINOX_DATA_DIR", str(ddir))
    assert cli("tenants", "create", "acme").exit_code == 0
    result = cli("tenants", "move", "acme", "--to", "nonsense")
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert "pool" in result.output and "silo" in result.output
    # Names are case-insensitive: SILO is silo.
    result = cli("tenants", "move", "acme", "--to", "SILO")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_nul_bytes_in_ids_and_keys_are_client_errors_not_storage_errors(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: put a NUL byte (``%00``) in a memory key, a run or agent id, a list filter
    or the memory prefix on PostgreSQL. psycopg refuses NUL in text and every such request
    answers ``503 storage_error`` "database error: DataError" — a server-side failure that
    tells clients to retry and lets any tenant make the server log database errors at
    will.

    Correct: a 4xx (422 invalid_request, or 404 for an id that cannot exist), never 5xx.
    """
    a = make_tenant("alpha")
    agent = a.agent("x")
    probes = [
        ("PUT", "/v1/memory/a%00b", {"value": "v"}),
        ("GET", "/v1/memory?prefix=%00", None),
        ("GET", "/v1/runs?agent_id=a%00", None),
        ("GET", "/v1/runs/run%00x", None),
        ("GET", "/v1/agents/ag%00x", None),
        ("POST", "/v1/agents/ag%00x/runs", {"input": "hi", "mode": "async"}),
    ]
    answers = {u: client.request(m, u, json=body, headers=a.h).status_code for m, u, body in probes}
    assert all(400 <= c < 500 for c in answers.values()), answers
    assert a.run(agent, "still fine", output_tokens=1).status_code == 200


def test_queued_run_of_a_revoked_key_does_not_execute(runtime: Runtime, operator_key: str) -> None:
    """Attack: with a leaked key, queue async runs whose agent writes memory (up to the
    tenant's runs_per_day of them); the owner notices and revokes the key. The worker
    still executes every queued run — under the revoked key as principal, with a
    ``runs:write`` context built from the run row — so revocation does not stop the
    attacker's queued writes.

    Correct: a queued run whose key was revoked before it started is not executed
    (recorded as failed, e.g. reason ``key_revoked``) and writes nothing.
    """
    runtime.settings = dataclasses.replace(runtime.settings, embedded_workers=0)
    with TestClient(create_app(runtime=runtime), raise_server_exceptions=False) as client:
        a = TenantHandle(client, operator_key, "alpha")
        agent = a.agent("m", tools=["memory_put"], max_tool_calls=1)
        plant = '/call memory_put {"key": "planted", "value": "evil"}'
        r = a.run(agent, plant, mode="async", output_tokens=1)
        assert r.status_code == 202
        run_id = r.json()["id"]
        revoke = client.delete(f"/admin/tenants/{a.id}/keys/{a.key_id}", headers=auth(operator_key))
        assert revoke.status_code == 200

        async def work() -> None:
            while (c := runtime.queue.claim("w")) is not None:
                await runtime.runs.execute_claim(c)

        asyncio.run(work())
        k = client.post(f"/admin/tenants/{a.id}/keys", json={"name": "k2"}, headers=auth(operator_key))
        h = auth(k.json()["key"])
        assert client.get(f"/v1/runs/{run_id}", headers=h).json()["status"] != "succeeded"
        assert client.get("/v1/memory", headers=h).json() == []
