"""API keys: only a whole, live key of a live tenant authenticates, and revocation stops its work.

Attacks: spliced, truncated, re-cased keys or keys under another auth scheme, an old key
kept across the deletion and same-name re-creation of its tenant, async runs queued with a
leaked key that is then revoked. Every test performs the attack and asserts the correct
behaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi.testclient import TestClient

from patinox.api import create_app
from patinox.runtime import Runtime
from tests.conftest import TenantHandle, auth


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
