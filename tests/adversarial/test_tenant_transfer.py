"""Export, import and move carry a tenant's data, never its keys, and leave nothing behind.

Attacks: import A's bundle as a new tenant and try A's key on it, import with a wrong
passphrase or a flipped byte, move a tenant to another storage model while its runs wait
in the queue. The copy holds no key of A and no link to it, a bad bundle creates nothing,
and a moved tenant's later writes land in its new placement only. Every test performs the
attack and asserts the correct behaviour.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from patinox.control.transfer import export_tenant, import_tenant, move_tenant
from patinox.runtime import Runtime
from patinox.tenancy import StorageModel
from tests.adversarial._helpers import (
    no_workers,
)
from tests.conftest import Deployment, TenantHandle, auth, count_tenant_rows


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


_CONTROL = ("api_keys", "tenant_keys", "run_queue", "queue_tenants", "quota_ledger")


def test_move_with_queued_runs_leaves_nothing_in_the_old_placement(
    runtime: Runtime, operator_key: str, deployment: Deployment
) -> None:
    """Attack: queue async runs that write memory, move the tenant pool -> silo while they
    wait, then let a worker run them: their writes must land in the new placement, and no
    row of the tenant may remain readable in the shared pool tables."""
    with no_workers(runtime) as client:
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
