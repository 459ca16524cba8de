"""Webhook endpoints are tenant data like agents: an export carries them (secrets sealed
in the bundle, never in plaintext) and an import restores them, secrets and all; a move
brings them to the tenant's new placement and deliveries go on; deleting the tenant
purges endpoints, deliveries and the delivery log; crypto-shredding makes the secrets
unreadable, and a delivery then fails without being sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from patinox.control.transfer import _bundle, export_tenant, import_tenant, move_tenant
from patinox.errors import TenantKeysDestroyed
from patinox.runtime import Runtime
from patinox.tenancy import StorageModel
from tests._webhooks import Receiver, Tenant, client, deliver, pending, receiver, rt
from tests.conftest import Deployment, auth, count_tenant_rows

__all__ = ["client", "receiver", "rt"]  # fixtures used by name

PASS = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bundle, "SCRYPT_N", 2**14)


def _webhook_rows(counts: dict[str, int]) -> dict[str, int]:
    return {k: n for k, n in counts.items() if "webhook_" in k and n}


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool", "pg-silo"], indirect=True)
def test_export_and_import_carry_endpoints_with_their_secrets(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment, tmp_path: Path
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    rotated = client.post(f"/v1/webhooks/{ep['id']}/rotate", json={"overlap_s": 3600}, headers=t.h).json()
    bundle = tmp_path / "acme.ptx"
    summary = export_tenant(rt.backend, t.id, bundle, passphrase=PASS)
    assert summary.counts["webhook_endpoint"] == 1
    raw = bundle.read_bytes()
    assert ep["secret"].encode() not in raw and rotated["secret"].encode() not in raw

    imported = import_tenant(rt.backend, bundle, passphrase=PASS, name="acme-copy", actor="test")
    store = rt.backend.acting_on(imported.id)
    endpoint, secrets = store.webhooks().secrets(ep["id"])
    assert secrets == [rotated["secret"], ep["secret"]]  # the rotation's overlap goes on
    assert endpoint["url"] == receiver.url and endpoint["event_types"] == ep["event_types"]
    # The copy's endpoint receives the copy's runs, signed with the same secrets.
    key = rt.keys.create(tenant_id=imported.id, name="k", scopes=None, actor="test").secret
    agent = client.get("/v1/agents", headers=auth(key)).json()[0]["id"]
    r = client.post(f"/v1/agents/{agent}/runs", json={"input": "hi"}, headers=auth(key))
    assert r.status_code == 200, r.text
    assert deliver(rt) == 1
    from patinox.client import verify_signature

    got = receiver.received[-1]
    assert verify_signature(rotated["secret"], got.headers, got.body)


@pytest.mark.parametrize(
    ("deployment", "to"),
    [("sqlite-pool", StorageModel.SILO), ("pg-pool", StorageModel.BRIDGE), ("pg-bridge", StorageModel.POOL)],
    indirect=["deployment"],
)
def test_a_move_brings_endpoints_along_and_pending_deliveries_are_sent_after_it(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment, to: StorageModel
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    t.run()
    assert len(pending(rt, t.id, ep["id"])) == 1
    move_tenant(rt.backend, t.id, to, actor="test", grace_s=0)
    rows = _webhook_rows(count_tenant_rows(deployment, t.id))
    endpoint_rows = {k: n for k, n in rows.items() if "webhook_endpoints" in k}
    assert sum(endpoint_rows.values()) == 1, rows  # one copy, in the new placement
    assert deliver(rt) == 1 and len(receiver.received) == 1
    assert client.get(f"/v1/webhooks/{ep['id']}/deliveries", headers=t.h).json()[0]["status_code"] == 200


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-pool", "pg-bridge"], indirect=True)
def test_deleting_a_tenant_purges_endpoints_deliveries_and_the_log_and_spares_its_neighbours(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    a = Tenant(client, rt, "alpha", deployment.storage_model)
    b = Tenant(client, rt, "beta", deployment.storage_model)
    for x in (a, b):
        x.endpoint(receiver.url)
        x.run()
        x.run()
    assert deliver(rt) == 4  # two delivered per tenant, and logged
    for x in (a, b):
        x.run()  # one more pending each
    before = _webhook_rows(count_tenant_rows(deployment, a.id))
    assert len(before) == 3, before  # endpoints, deliveries, attempts
    op = rt.keys.create(tenant_id=None, name="op2", scopes=None, actor="test").secret
    assert client.delete(f"/admin/tenants/{a.id}", headers=auth(op)).status_code == 200
    assert _webhook_rows(count_tenant_rows(deployment, a.id)) == {}
    kept = _webhook_rows(count_tenant_rows(deployment, b.id))
    assert sorted(n for n in kept.values()) == [1, 2, 3], kept  # endpoint 1, attempts 2, deliveries 3
    assert deliver(rt) == 1 and len(receiver.received) == 5  # only B's pending one is sent


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-silo"], indirect=True)
def test_crypto_shredding_makes_the_secrets_unreadable_and_nothing_is_sent(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    t.run()
    rt.backend.keyring.shred(t.id)
    with pytest.raises(TenantKeysDestroyed):
        rt.backend.acting_on(t.id).webhooks().secrets(ep["id"])
    assert asyncio.run(rt.webhook_dispatcher(holder="x").deliver_due()) == 1
    assert receiver.received == []
    assert rt.webhooks is not None
    (entry,) = rt.webhooks.outbox.log(t.id, ep["id"])
    assert entry["error"].startswith("secret_unreadable")
    assert [d["state"] for d in pending(rt, t.id, ep["id"])] == ["failed"]
