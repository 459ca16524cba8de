"""BYOK: a tenant's own provider key (the secret ``provider:openai``) is what its runs send
to the provider; a tenant without one uses the deployment's shared key. Tested against a
real local HTTP server standing in for OpenAI. A planted key never appears in any
response, error body, audit record, log line or run output, also when the provider fails."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.agents import models
from patinox.runtime import Runtime
from patinox.tenancy import get_plan
from tests.agents.fake_provider import FakeProvider, fake_provider
from tests.conftest import auth

TENANT_KEY = "sk-canary-byok-tenant-a-4f1e9b"
SHARED_KEY = "sk-shared-deployment-key"


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    with fake_provider() as fake:
        monkeypatch.setenv("OPENAI_API_KEY", SHARED_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        models._provider_model.cache_clear()
        models._provider_model_with_key.cache_clear()
        yield fake
        models._provider_model.cache_clear()
        models._provider_model_with_key.cache_clear()


def admin_headers(client: TestClient, operator_key: str, tenant_id: str) -> dict[str, str]:
    r = client.post(
        f"/admin/tenants/{tenant_id}/keys",
        json={"name": "admin", "scopes": ["read", "secrets:write", "agents:write", "runs:write"]},
        headers=auth(operator_key),
    )
    assert r.status_code == 201, r.text
    return auth(r.json()["key"])


@pytest.mark.only_deployments("sqlite-pool", "pg-pool")
def test_a_tenants_runs_carry_its_own_key_and_others_the_shared_one(
    client: TestClient,
    operator_key: str,
    make_tenant: Any,
    provider: FakeProvider,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = make_tenant("alpha", "pro"), make_tenant("beta", "pro")
    ha, hb = admin_headers(client, operator_key, a.id), admin_headers(client, operator_key, b.id)
    seen: list[str] = []

    def call(method: str, path: str, headers: dict[str, str], **kw: Any) -> Any:
        r = client.request(method, path, headers=headers, **kw)
        seen.append(r.text + repr(dict(r.headers)))
        return r

    assert call("PUT", "/v1/secrets/provider:openai", ha, json={"value": TENANT_KEY}).status_code == 201
    agent_a = call("POST", "/v1/agents", ha, json={"name": "gpt", "model": "openai:gpt-4o"}).json()["id"]
    agent_b = call("POST", "/v1/agents", hb, json={"name": "gpt", "model": "openai:gpt-4o"}).json()["id"]

    ra = call("POST", f"/v1/agents/{agent_a}/runs", ha, json={"input": "hello"})
    assert ra.status_code == 200, ra.text
    assert ra.json()["output"] == "fake provider reply" and ra.json()["output_tokens"] == 3
    assert provider.authorizations == [f"Bearer {TENANT_KEY}"]
    rb = call("POST", f"/v1/agents/{agent_b}/runs", hb, json={"input": "hello"})
    assert rb.status_code == 200, rb.text
    assert provider.authorizations == [f"Bearer {TENANT_KEY}", f"Bearer {SHARED_KEY}"]
    # Each tenant's usage is its own, whoever's key paid.
    for h in (ha, hb):
        usage = call("GET", "/v1/usage", h).json()
        assert [(u["model"], u["input_tokens"], u["output_tokens"]) for u in usage["records"]] == [
            ("openai:gpt-4o", 11, 3)
        ], usage

    # The provider fails: the run fails, and nothing of the key comes out.
    provider.failing = True
    failed = call("POST", f"/v1/agents/{agent_a}/runs", ha, json={"input": "again"})
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "run_failed", failed.text
    assert provider.authorizations[-1] == f"Bearer {TENANT_KEY}"
    # The provider refuses the key and quotes it back: that text goes nowhere either.
    provider.failing, provider.rejecting = False, True
    rejected = call("POST", f"/v1/agents/{agent_a}/runs", ha, json={"input": "once more"})
    assert rejected.status_code == 502 and rejected.json()["error"]["code"] == "run_failed", rejected.text
    provider.rejecting = False
    call("GET", "/v1/runs", ha)
    # Deleted, the tenant's key is no longer used: the shared one is.
    provider.failing = False
    assert call("DELETE", "/v1/secrets/provider:openai", ha).status_code == 204
    assert call("POST", f"/v1/agents/{agent_a}/runs", ha, json={"input": "x"}).status_code == 200
    assert provider.authorizations[-1] == f"Bearer {SHARED_KEY}"

    audit = call("GET", "/v1/audit", ha, params={"limit": 500}).json()
    uses = [e for e in audit if e["action"] == "secret.use"]
    assert len(uses) == 3 and all(e["target"] == "provider:openai" for e in uses)
    assert all(e["detail"]["purpose"] == "model:openai:gpt-4o" for e in uses)
    out = capsys.readouterr()
    everything = "\n".join([*seen, caplog.text, out.out, out.err])
    assert TENANT_KEY not in everything


@pytest.mark.only_deployments("sqlite-pool")
def test_at_the_process_level_the_host_makes_the_call_with_the_tenants_key(
    client: TestClient, operator_key: str, provider: FakeProvider, runtime: Runtime
) -> None:
    r = client.post(
        "/admin/tenants",
        json={"name": "proc", "plan": "pro", "isolation_level": "process"},
        headers=auth(operator_key),
    )
    assert r.status_code == 201, r.text
    h = admin_headers(client, operator_key, r.json()["id"])
    assert client.put("/v1/secrets/provider:openai", json={"value": TENANT_KEY}, headers=h).status_code == 201
    agent = client.post("/v1/agents", json={"name": "gpt", "model": "openai:gpt-4o"}, headers=h).json()["id"]
    run = client.post(f"/v1/agents/{agent}/runs", json={"input": "hello"}, headers=h)
    assert run.status_code == 200, run.text
    assert run.json()["output"] == "fake provider reply"
    assert provider.authorizations == [f"Bearer {TENANT_KEY}"]
    assert TENANT_KEY not in run.text
    # The execution process that ran it never held the key: not in its memory.
    assert runtime.process_executor is not None
    tenant_id = r.json()["id"]
    pool = runtime.process_executor.supervisor.pool(tenant_id, get_plan("pro").limits)
    pids = [p.pid for p in pool.processes()]
    assert pids
    for pid in pids:
        assert _memory_holds(pid, b"patinox.isolation"), pid  # its memory is read
        assert _memory_holds(pid, TENANT_KEY.encode()) is False, pid
    assert _memory_holds(os.getpid(), TENANT_KEY.encode())  # the scan finds what is there


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of process ``pid`` holds ``needle`` (read as root through
    ``/proc/<pid>/mem``)."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar" in line or "[vsyscall" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if chunk and needle in chunk:
                found = True
                break
    return found
