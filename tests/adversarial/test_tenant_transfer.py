"""Adversarial attacks, round 2, that the build defends (kept as coverage)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from patinox.api import Runtime, create_app
from patinox.control.transfer import export_tenant, import_tenant, move_tenant
from patinox.tenancy import StorageModel
from tests.conftest import Deployment, TenantHandle, auth, count_tenant_rows

_CONTROL = ("api_keys", "tenant_keys", "run_queue", "queue_tenants", "quota_ledger")


def _no_workers(runtime: Runtime) -> TestClient:
    runtime.settings = dataclasses.replace(runtime.settings, embedded_workers=0)
    return TestClient(create_app(runtime=runtime), raise_server_exceptions=False)


def test_queued_runs_of_a_suspended_tenant_are_not_claimed(runtime: Runtime, operator_key: str) -> None:
    """Attack: queue runs, get suspended, hope a worker still executes them. The claim
    skips tenants that are not active; after resume they run."""
    with _no_workers(runtime) as client:
        a = TenantHandle(client, operator_key, "alpha")
        agent = a.agent("x")
        for _ in range(3):
            assert a.run(agent, "hi", mode="async", output_tokens=1).status_code == 202
        assert client.post(f"/admin/tenants/{a.id}/suspend", headers=auth(operator_key)).status_code == 200
        assert runtime.queue.claim("w") is None
        assert client.post(f"/admin/tenants/{a.id}/resume", headers=auth(operator_key)).status_code == 200
        assert runtime.queue.claim("w") is not None


def test_async_runs_per_day_are_not_overbooked_by_concurrent_requests(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: fire 8 async runs at once at a tenant with runs_per_day=3 and hope the
    counter races. Exactly 3 are admitted."""
    a = make_tenant("alpha", limits={"runs_per_day": 3})
    agent = a.agent("x")
    codes: list[int] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        codes.append(a.run(agent, "hi", mode="async", output_tokens=1).status_code)

    ts = [threading.Thread(target=go) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(codes) == [202] * 3 + [429] * 5


def test_async_run_on_a_foreign_agent_is_not_found_and_costs_nothing(
    client: TestClient, make_tenant: Any, runtime: Runtime
) -> None:
    """Attack: tenant B queues an async run naming A's agent id (to run A's agent, or burn
    A's quota). It answers 404 and neither tenant's queue gains an entry."""
    a, b = make_tenant("alpha"), make_tenant("beta", limits={"runs_per_day": 1})
    agent = a.agent("x")
    r = b.run(agent, "hi", mode="async")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert runtime.queue.depth(a.id) == runtime.queue.depth(b.id) == 0
    own = b.agent("y")
    assert b.run(own, "hi", mode="async", output_tokens=1).status_code == 202  # quota unspent


def test_per_agent_rate_limit_of_one_tenant_cannot_be_spent_by_another(
    client: TestClient, make_tenant: Any
) -> None:
    """Attack: B hammers POST /v1/agents/<A's agent>/runs to exhaust A's per-agent limit.
    The window key includes the tenant, so A's own runs are still admitted."""
    a = make_tenant("alpha", limits={"agent_runs_per_minute": 2})
    b = make_tenant("beta")
    agent = a.agent("x")
    for _ in range(5):
        assert b.run(agent, "hi").status_code in (404, 429)
    assert a.run(agent, "hi", output_tokens=1).status_code == 200


def test_bundle_of_a_imported_as_b_carries_no_keys_and_no_link_to_a(
    client: TestClient, make_tenant: Any, runtime: Runtime, operator_key: str, tmp_path: Path
) -> None:
    """Attack: export A, import it as a new tenant and try A's key against the copy; check
    the copy gets none of A's keys and A's key still reaches A only."""
    a = make_tenant("alpha")
    agent = a.agent("m", tools=["memory_put"])
    assert client.put("/v1/memory/secret", json={"value": "s3cret"}, headers=a.h).status_code == 200
    bundle = tmp_path / "a.bundle"
    export_tenant(runtime.backend, a.id, bundle, passphrase="pw-pw-pw-pw")
    copy = import_tenant(runtime.backend, bundle, passphrase="pw-pw-pw-pw", name="alpha-copy", actor="t")
    assert copy.id != a.id
    assert runtime.backend.list_api_keys(copy.id) == []
    assert client.get(f"/v1/agents/{agent}", headers=a.h).json()["id"] == agent
    r = client.post(f"/admin/tenants/{copy.id}/keys", json={"name": "k"}, headers=auth(operator_key))
    hc = auth(r.json()["key"])
    assert client.get("/v1/me", headers=hc).json()["tenant_id"] == copy.id
    assert client.get("/v1/memory/secret", headers=hc).json()["value"] == "s3cret"
    # deleting A shreds A only
    assert client.delete(f"/admin/tenants/{a.id}", headers=auth(operator_key)).status_code == 200
    assert client.get("/v1/memory/secret", headers=hc).json()["value"] == "s3cret"
    assert client.get("/v1/me", headers=a.h).status_code == 401


def test_wrong_passphrase_import_creates_nothing(
    client: TestClient, make_tenant: Any, runtime: Runtime, operator_key: str, tmp_path: Path
) -> None:
    """Attack: import a bundle with a wrong passphrase / a flipped byte; nothing is created."""
    a = make_tenant("alpha")
    bundle = tmp_path / "a.bundle"
    export_tenant(runtime.backend, a.id, bundle, passphrase="right-passphrase")
    before = len(client.get("/admin/tenants", headers=auth(operator_key)).json())
    for pw, mangle in (("wrong-passphrase", False), ("right-passphrase", True)):
        if mangle:
            data = bytearray(bundle.read_bytes())
            data[-5] ^= 1
            bundle.write_bytes(bytes(data))
        try:
            import_tenant(runtime.backend, bundle, passphrase=pw, name="evil", actor="t")
        except Exception as err:
            assert type(err).__name__ in ("BundleRejected",), repr(err)
        else:
            raise AssertionError("import accepted a bad bundle")
    assert len(client.get("/admin/tenants", headers=auth(operator_key)).json()) == before


def test_move_with_queued_runs_leaves_nothing_in_the_old_placement(
    runtime: Runtime, operator_key: str, deployment: Deployment
) -> None:
    """Attack: queue async runs that write memory, move the tenant pool -> silo while they
    wait, then let a worker run them: their writes must land in the new placement, and no
    row of the tenant may remain readable in the shared pool tables."""
    with _no_workers(runtime) as client:
        a = TenantHandle(client, operator_key, "alpha")
        b = TenantHandle(client, operator_key, "beta")
        agent = a.agent("m", tools=["memory_put"], max_tool_calls=1)
        assert client.put("/v1/memory/before", json={"value": "v0"}, headers=a.h).status_code == 200
        ids = []
        for i in range(2):
            call = f'/call memory_put {{"key": "k{i}", "value": "after"}}'
            r = a.run(agent, call, mode="async", output_tokens=1)
            assert r.status_code == 202
            ids.append(r.json()["id"])
        move_tenant(runtime.backend, a.id, StorageModel.SILO, actor="t", grace_s=0.0)

        async def work() -> None:
            while (c := runtime.queue.claim("w")) is not None:
                await runtime.runs.execute_claim(c)

        asyncio.run(work())
        for rid in ids:
            assert client.get(f"/v1/runs/{rid}", headers=a.h).json()["status"] == "succeeded"
        assert sorted(client.get("/v1/memory", headers=a.h).json()) == ["before", "k0", "k1"]
        assert client.get("/v1/memory", headers=b.h).json() == []
        rows = count_tenant_rows(deployment, a.id)
        pool = {k: v for k, v in rows.items() if not k.startswith(("silo:", "<")) and k not in _CONTROL}
        assert all(v == 0 for v in pool.values()), pool
