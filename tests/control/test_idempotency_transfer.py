"""``Idempotency-Key`` records are tenant data like runs and memory: an export carries
them (sealed in the bundle, never in plaintext), an import and a storage move bring them
to the tenant's new placement (a retry after either still answers the first response),
and deleting the tenant purges them.

Before, the table did not exist; once it did, a move or export that did not know it
refused the tenant (``unknown_table``) or left its rows behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from patinox.control.transfer import _bundle, export_tenant, import_tenant, move_tenant
from patinox.runtime import Runtime
from patinox.storage import SqlBackend
from patinox.tenancy import StorageModel
from tests.conftest import Deployment, TenantHandle, auth, count_tenant_rows

MARK = "okapi-plaintext-marker"
PASS = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bundle, "SCRYPT_N", 2**14)


def keyed_run(client: TestClient, h: dict[str, str], agent: str, key: str) -> httpx.Response:
    return client.post(
        f"/v1/agents/{agent}/runs",
        json={"input": f"{MARK} hello", "output_tokens": 3},
        headers={**h, "Idempotency-Key": key},
    )


def idem_rows(counts: dict[str, int]) -> dict[str, int]:
    return {k: n for k, n in counts.items() if k.endswith("idempotency_keys") and n}


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_export_and_import_carry_the_kept_responses(
    client: TestClient, make_tenant: Any, runtime: Runtime, backend: SqlBackend, tmp_path: Path
) -> None:
    t: TenantHandle = make_tenant("acme", "pro")
    agent = t.agent()
    first = keyed_run(client, t.h, agent, "order-7")
    assert first.status_code == 200
    bundle = tmp_path / "acme.ptx"
    summary = export_tenant(backend, t.id, bundle, passphrase=PASS)
    assert summary.counts["idempotency_key"] == 1
    assert MARK.encode() not in bundle.read_bytes()

    imported = import_tenant(backend, bundle, passphrase=PASS, name="acme-copy", actor="test")
    h = auth(runtime.keys.create(tenant_id=imported.id, name="k", scopes=None, actor="test").secret)
    again = keyed_run(client, h, agent, "order-7")
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert len(client.get("/v1/runs", headers=h).json()) == 1


@pytest.mark.parametrize(
    ("deployment", "to"),
    [("sqlite-pool", StorageModel.SILO), ("pg-pool", StorageModel.BRIDGE), ("pg-pool", StorageModel.SILO)],
    indirect=["deployment"],
)
def test_a_move_brings_the_keys_along_and_deletion_purges_them(
    client: TestClient,
    make_tenant: Any,
    backend: SqlBackend,
    deployment: Deployment,
    operator_key: str,
    to: StorageModel,
) -> None:
    t: TenantHandle = make_tenant("acme", "pro")
    agent = t.agent()
    first = keyed_run(client, t.h, agent, "order-8")
    assert idem_rows(count_tenant_rows(deployment, t.id)) == {
        "idempotency_keys" if not deployment.postgres else "public.idempotency_keys": 1
    }

    move_tenant(backend, t.id, to, actor="test", grace_s=0)

    rows = idem_rows(count_tenant_rows(deployment, t.id))
    assert len(rows) == 1 and sum(rows.values()) == 1
    (where,) = rows
    assert not where.startswith(("public.", "idempotency")), rows  # in the tenant's own placement now
    again = keyed_run(client, t.h, agent, "order-8")
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"

    r = client.delete(f"/admin/tenants/{t.id}", headers=auth(operator_key))
    assert r.status_code == 200, r.text
    assert idem_rows(count_tenant_rows(deployment, t.id)) == {}


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_deleting_a_pool_tenant_purges_its_keys_and_spares_its_neighbours(
    client: TestClient, make_tenant: Any, deployment: Deployment, operator_key: str
) -> None:
    a, b = make_tenant("alpha"), make_tenant("beta")
    for x in (a, b):
        assert keyed_run(client, x.h, x.agent(), "same-key").status_code == 200
    assert sum(idem_rows(count_tenant_rows(deployment, a.id)).values()) == 1
    assert client.delete(f"/admin/tenants/{a.id}", headers=auth(operator_key)).status_code == 200
    assert idem_rows(count_tenant_rows(deployment, a.id)) == {}
    assert sum(idem_rows(count_tenant_rows(deployment, b.id)).values()) == 1
