"""Threads and their messages are tenant data like runs and memory: an export carries them
(sealed in the bundle, never in plaintext), an import and a storage move bring them to the
tenant's new placement (the conversation goes on there with its history), and deleting
the tenant purges them while its neighbours keep theirs.

Before, an export or a move that did not know the tables refused a tenant holding threads
(``unknown_table``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.control.transfer import _bundle, export_tenant, import_tenant, move_tenant
from patinox.runtime import Runtime
from patinox.storage import SqlBackend
from patinox.tenancy import StorageModel
from tests.conftest import Deployment, TenantHandle, auth, count_tenant_rows

MARK = "pangolin-plaintext-marker"
META = "tapir-metadata-marker"
PASS = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bundle, "SCRYPT_N", 2**14)


def conversation(client: TestClient, h: dict[str, str], agent: str) -> str:
    r = client.post("/v1/threads", json={"metadata": {"note": META}}, headers=h)
    assert r.status_code == 201, r.text
    thread = str(r.json()["id"])
    r = client.post(
        f"/v1/threads/{thread}/runs",
        json={"agent_id": agent, "input": f"{MARK} hello", "output_tokens": 3},
        headers=h,
    )
    assert r.status_code == 200, r.text
    return thread


def thread_rows(counts: dict[str, int]) -> dict[str, int]:
    """The counts of the two thread tables (``public.threads``, ``silo:threads``...) that hold rows."""
    tables = ("threads", "thread_messages")
    return {k: n for k, n in counts.items() if k.split(".")[-1].split(":")[-1] in tables and n}


def messages(client: TestClient, h: dict[str, str], thread: str) -> list[tuple[str, str]]:
    r = client.get(f"/v1/threads/{thread}/messages", headers=h)
    assert r.status_code == 200, r.text
    return [(m["role"], m["content"]) for m in r.json()]


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_export_and_import_carry_threads_and_their_messages(
    client: TestClient, make_tenant: Any, runtime: Runtime, backend: SqlBackend, tmp_path: Path
) -> None:
    t: TenantHandle = make_tenant("acme", "pro")
    agent = t.agent()
    thread = conversation(client, t.h, agent)
    before = messages(client, t.h, thread)
    bundle = tmp_path / "acme.ptx"
    summary = export_tenant(backend, t.id, bundle, passphrase=PASS)
    assert (summary.counts["thread"], summary.counts["thread_message"]) == (1, 2)
    raw = bundle.read_bytes()
    assert MARK.encode() not in raw and META.encode() not in raw

    imported = import_tenant(backend, bundle, passphrase=PASS, name="acme-copy", actor="test")
    h = auth(runtime.keys.create(tenant_id=imported.id, name="k", scopes=None, actor="test").secret)
    assert messages(client, h, thread) == before
    assert client.get(f"/v1/threads/{thread}", headers=h).json()["metadata"] == {"note": META}
    # The conversation goes on in the new tenant, with its history.
    r = client.post(f"/v1/threads/{thread}/runs", json={"agent_id": agent, "input": "again"}, headers=h)
    assert r.status_code == 200, r.text
    assert len(messages(client, h, thread)) == 4
    assert len(messages(client, t.h, thread)) == 2  # the original is its own


@pytest.mark.parametrize(
    ("deployment", "to"),
    [("sqlite-pool", StorageModel.SILO), ("pg-pool", StorageModel.BRIDGE), ("pg-pool", StorageModel.SILO)],
    indirect=["deployment"],
)
def test_a_move_brings_threads_along_and_deletion_purges_them(
    client: TestClient,
    make_tenant: Any,
    backend: SqlBackend,
    deployment: Deployment,
    operator_key: str,
    to: StorageModel,
) -> None:
    t: TenantHandle = make_tenant("acme", "pro")
    neighbour: TenantHandle = make_tenant("beta", "pro")
    agent = t.agent()
    thread = conversation(client, t.h, agent)
    conversation(client, neighbour.h, neighbour.agent())
    before = messages(client, t.h, thread)
    assert sum(thread_rows(count_tenant_rows(deployment, t.id)).values()) == 3

    move_tenant(backend, t.id, to, actor="test", grace_s=0)

    rows = thread_rows(count_tenant_rows(deployment, t.id))
    assert sum(rows.values()) == 3
    assert not any(k.startswith("public.") or k in ("threads", "thread_messages") for k in rows), rows
    assert messages(client, t.h, thread) == before

    r = client.delete(f"/admin/tenants/{t.id}", headers=auth(operator_key))
    assert r.status_code == 200, r.text
    assert thread_rows(count_tenant_rows(deployment, t.id)) == {}
    assert sum(thread_rows(count_tenant_rows(deployment, neighbour.id)).values()) == 3


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_deleting_a_pool_tenant_purges_its_threads_and_spares_its_neighbours(
    client: TestClient, make_tenant: Any, deployment: Deployment, operator_key: str
) -> None:
    a, b = make_tenant("alpha"), make_tenant("beta")
    for x in (a, b):
        conversation(client, x.h, x.agent())
    assert sum(thread_rows(count_tenant_rows(deployment, a.id)).values()) == 3
    assert client.delete(f"/admin/tenants/{a.id}", headers=auth(operator_key)).status_code == 200
    assert thread_rows(count_tenant_rows(deployment, a.id)) == {}
    assert sum(thread_rows(count_tenant_rows(deployment, b.id)).values()) == 3
