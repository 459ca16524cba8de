"""Export/import bundles and online storage moves, on real SQLite and PostgreSQL.

Every check of "the data is still there" goes through the HTTP API with a tenant key, so
it covers decryption with the tenant's keys and the placement the API resolves; every
check of "nothing is left" reads the storage itself (``count_tenant_rows``).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import String, insert

from patinox.api import create_app
from patinox.control import transfer
from patinox.control.tenants import TenantManager
from patinox.control.transfer import (
    BundleRejected,
    TenantMoveFailed,
    _bundle,
    _import,
    _move,
    abort_move,
    export_tenant,
    generate_recipient_keypair,
    import_tenant,
    move_tenant,
)
from patinox.errors import (
    AlreadyExists,
    InvalidRequest,
    InvalidTransition,
    OperationFailed,
    StorageError,
    TenantNotFound,
)
from patinox.runtime import Runtime, Settings
from patinox.storage import SqlBackend, open_backend, utcnow
from patinox.storage import _schema as schema
from patinox.storage.crypto import FileKeyProvider, key_provider_from_url
from patinox.storage.postgres import PostgresDeployment
from patinox.tenancy import StorageModel
from tests.conftest import Deployment, TenantHandle, _reset_postgres, auth, count_tenant_rows

#: Appears in every payload; must never appear in a bundle's bytes.
MARK = "zebra-plaintext-marker"
PASS = "correct horse battery staple"
CONTROL = transfer.CONTROL_PLANE_TABLES
#: Limit overrides for test tenants: the checks below read a lot through the API.
UNLIMITED = {"requests_per_minute": 1_000_000}


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scrypt at its minimum accepted cost (2**14), so the suite stays fast; one test uses the default."""
    monkeypatch.setattr(_bundle, "SCRYPT_N", 2**14)


def populate(t: TenantHandle) -> None:
    """Agents, memory, runs (one with a tool call), hence usage and audit records too."""
    a1 = t.agent("alpha", instructions=f"be brief {MARK}", tools=["calculator"])
    a2 = t.agent("beta")
    for i in range(3):
        r = t.client.put(f"/v1/memory/k{i}", json={"value": f"{MARK} value {i}"}, headers=t.h)
        assert r.status_code == 200, r.text
    r = t.run(a1, f'{MARK} compute\n/call calculator {{"expression": "6*7"}}', output_tokens=6)
    assert r.status_code == 200, r.text
    r = t.run(a2, f"{MARK} hello", output_tokens=5)
    assert r.status_code == 200, r.text
    r = t.run(a2, f"{MARK} again", output_tokens=3)
    assert r.status_code == 200, r.text


def snapshot(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    """Everything a tenant can read back through the API, minus ids of the tenant and keys."""
    agents = client.get("/v1/agents", headers=headers)
    assert agents.status_code == 200, agents.text
    keys = client.get("/v1/memory", headers=headers).json()
    memory = {k: client.get(f"/v1/memory/{k}", headers=headers).json()["value"] for k in keys}
    runs = client.get("/v1/runs", params={"limit": 200}, headers=headers)
    assert runs.status_code == 200, runs.text
    fields = ("id", "agent_id", "status", "input", "output", "input_tokens", "output_tokens", "tool_calls")
    return {
        "agents": sorted(
            (a["id"], a["name"], a["instructions"], a["model"], tuple(a["tools"])) for a in agents.json()
        ),
        "memory": memory,
        "runs": sorted(tuple(r[f] for f in fields) for r in runs.json()),
    }


def actions(client: TestClient, headers: dict[str, str]) -> list[str]:
    r = client.get("/v1/audit", params={"limit": 500}, headers=headers)
    assert r.status_code == 200, r.text
    return [a["action"] for a in r.json()]


def new_key(runtime: Runtime, tenant_id: str) -> dict[str, str]:
    return auth(runtime.keys.create(tenant_id=tenant_id, name="imported", scopes=None, actor="test").secret)


def data_rows(counts: dict[str, int], prefix: str = "") -> int:
    """Rows in tenant data tables (not control plane) among ``count_tenant_rows`` keys with ``prefix``."""
    return sum(
        n
        for k, n in counts.items()
        if k.startswith(prefix) and not k.startswith("<") and k.rsplit(".", 1)[-1] not in CONTROL
    )


# -- export / import -------------------------------------------------------------------


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_round_trip_next_to_the_original(
    client: TestClient, make_tenant: Any, runtime: Runtime, backend: SqlBackend, tmp_path: Path
) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    before = snapshot(client, t.h)
    bundle = tmp_path / "acme.ptx"
    seen: list[tuple[int, int]] = []

    summary = export_tenant(backend, t.id, bundle, passphrase=PASS, progress=lambda d, n: seen.append((d, n)))

    assert summary.counts["agent"] == 2 and summary.counts["memory"] == 3 and summary.counts["run"] == 3
    assert summary.counts["api_key"] == 1  # listed, not carried
    assert summary.size_bytes == bundle.stat().st_size
    assert seen and seen[-1][0] == seen[-1][1] == summary.records
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    raw = bundle.read_bytes()
    assert raw.startswith(b"PATINOX-EXPORT\x01")
    assert MARK.encode() not in raw and b"be brief" not in raw
    assert not list(tmp_path.glob(".acme.ptx.*"))  # no temporary file left

    progress: list[tuple[int, int]] = []
    imported = import_tenant(
        backend,
        bundle,
        passphrase=PASS,
        name="acme-copy",
        actor="test",
        progress=lambda d, n: progress.append((d, n)),
    )

    assert imported.id != t.id and imported.name == "acme-copy" and imported.state == "active"
    assert progress[-1] == (2 * bundle.stat().st_size, 2 * bundle.stat().st_size)
    h = new_key(runtime, imported.id)
    assert snapshot(client, h) == before
    assert snapshot(client, t.h) == before  # the original is untouched
    copied = actions(client, h)
    assert copied[0] == "tenant.create" and copied[-2:] == ["tenant.import", "key.create"]
    record = client.get("/v1/audit", params={"limit": 500}, headers=h).json()[-2]
    assert record["detail"]["source_tenant_id"] == t.id and record["detail"]["api_keys_not_carried"] == 1
    assert set(actions(client, t.h)) <= set(copied)
    usage = backend.acting_on(imported.id).list_usage()
    assert usage and {u["run_id"] for u in usage} == {
        u["run_id"] for u in backend.acting_on(t.id).list_usage()
    }


def test_recipient_key_bundle_into_another_storage_model(
    client: TestClient,
    make_tenant: Any,
    runtime: Runtime,
    backend: SqlBackend,
    deployment: Deployment,
    tmp_path: Path,
) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    before = snapshot(client, t.h)
    private, public = generate_recipient_keypair()
    bundle = tmp_path / "acme.ptx"
    export_tenant(backend, t.id, bundle, recipient_public_key=public)
    assert MARK.encode() not in bundle.read_bytes()

    other_private, _ = generate_recipient_keypair()
    n = len(backend.list_tenants(include_deleted=True))
    with pytest.raises(BundleRejected) as e:
        import_tenant(backend, bundle, recipient_private_key=other_private, name="x", actor="test")
    assert e.value.fields["reason"] == "wrong_recipient"
    with pytest.raises(BundleRejected) as e:
        import_tenant(backend, bundle, passphrase=PASS, name="x", actor="test")
    assert e.value.fields["reason"] == "wrong_key_kind"
    assert len(backend.list_tenants(include_deleted=True)) == n

    imported = import_tenant(
        backend,
        bundle,
        recipient_private_key=private,
        name="acme-silo",
        storage_model=StorageModel.SILO,
        actor="t",
    )

    assert imported.storage_model is StorageModel.SILO
    assert snapshot(client, new_key(runtime, imported.id)) == before
    rows = count_tenant_rows(deployment, imported.id)
    assert (
        rows["<file>"] == 1 and data_rows(rows, "silo:") > 0 and data_rows(rows) == data_rows(rows, "silo:")
    )


def test_import_into_another_deployment_on_postgres_silo(
    client: TestClient,
    make_tenant: Any,
    backend: SqlBackend,
    pg_deployment: PostgresDeployment,
    pg_admin_url: str,
    tmp_path: Path,
) -> None:
    """Export from embedded SQLite (pool), import into PostgreSQL (silo) with its own KEK."""
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    before = snapshot(client, t.h)
    bundle = tmp_path / "acme.ptx"
    export_tenant(backend, t.id, bundle, passphrase=PASS)

    _reset_postgres(pg_admin_url, pg_deployment)
    kek = tmp_path / "other-kek.json"
    FileKeyProvider.create(kek)
    settings = Settings(
        database_url=pg_deployment.app_url, owner_url=pg_deployment.owner_url, kek_url=f"file://{kek}"
    )
    other = open_backend(
        pg_deployment.app_url,
        owner_url=pg_deployment.owner_url,
        key_provider=key_provider_from_url(f"file://{kek}"),
    )
    try:
        rt = Runtime.build(settings, backend=other)
        imported = import_tenant(
            other, bundle, passphrase=PASS, storage_model=StorageModel.SILO, actor="test"
        )
        assert imported.name == "acme" and imported.storage_model is StorageModel.SILO
        with TestClient(create_app(runtime=rt), raise_server_exceptions=False) as c:
            assert snapshot(c, new_key(rt, imported.id)) == before
        pg = Deployment("pg-silo", pg_deployment.app_url, pg_deployment.owner_url, "silo", pg_admin_url)
        rows = count_tenant_rows(pg, imported.id)
        assert rows["<database>"] == 1 and data_rows(rows, "silo:") > 0
        assert data_rows(rows) == data_rows(rows, "silo:")
    finally:
        other.close()


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _header_end(data: bytes) -> int:
    return 19 + int.from_bytes(data[15:19], "big")


def test_wrong_passphrase_and_changed_bundles_create_nothing(
    make_tenant: Any, backend: SqlBackend, tmp_path: Path
) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    good = tmp_path / "good.ptx"
    export_tenant(backend, t.id, good, passphrase=PASS)
    data = good.read_bytes()
    end = _header_end(data)
    header = data[19:end]
    later = header.replace(b'"exported_at":"20', b'"exported_at":"21')
    assert later != header

    cases: dict[str, tuple[bytes, str | None, str]] = {
        "wrong passphrase": (data, "not the passphrase", "authentication_failed"),
        "body byte": (_flip(data, end + 40), PASS, "authentication_failed"),
        "last byte": (_flip(data, len(data) - 1), PASS, "authentication_failed"),
        "header byte (export time)": (data[:19] + later + data[end:], PASS, "authentication_failed"),
        "truncated": (data[:-20], PASS, "authentication_failed"),
        "trailing bytes": (data + b"\x00" * 32, PASS, "authentication_failed"),
        "not a bundle": (b"hello world " * 10, PASS, "not_a_bundle"),
        "future version": (data[:14] + b"\x02" + data[15:], PASS, "unsupported_version"),
    }
    live, every = len(backend.list_tenants()), len(backend.list_tenants(include_deleted=True))
    for label, (content, passphrase, reason) in cases.items():
        bad = tmp_path / "bad.ptx"
        bad.write_bytes(content)
        with pytest.raises(BundleRejected) as e:
            import_tenant(backend, bad, passphrase=passphrase, name="acme-copy", actor="test")
        assert e.value.fields["reason"] == reason, label
        assert isinstance(e.value, InvalidRequest) and e.value.http_status == 422
        assert len(backend.list_tenants(include_deleted=True)) == every, label
    assert len(backend.list_tenants()) == live
    with pytest.raises(AlreadyExists):  # the original still holds the name
        import_tenant(backend, good, passphrase=PASS, actor="test")
    assert len(backend.list_tenants(include_deleted=True)) == every


def test_rows_in_an_unknown_table_stop_export_and_move(
    make_tenant: Any, backend: SqlBackend, deployment: Deployment, tmp_path: Path
) -> None:
    """A table this build does not know is neither left behind nor dragged along: refused."""
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    with backend.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE gadgets (tenant_id VARCHAR(40) NOT NULL, name TEXT)")
        conn.exec_driver_sql(f"INSERT INTO gadgets VALUES ('{t.id}', 'g')")
    with pytest.raises(OperationFailed) as e:
        export_tenant(backend, t.id, tmp_path / "b.ptx", passphrase=PASS)
    assert e.value.fields["reason"] == "unknown_table" and not (tmp_path / "b.ptx").exists()
    with pytest.raises(OperationFailed) as e:
        move_tenant(backend, t.id, StorageModel.SILO, actor="test", grace_s=0)
    assert e.value.fields["reason"] == "unknown_table"
    row = backend.get_tenant(t.id)
    assert row["storage_model"] == "pool" and row["moving_to"] is None
    assert "<file>" not in count_tenant_rows(deployment, t.id)
    with backend.engine.begin() as conn:  # an empty one is no obstacle
        conn.exec_driver_sql("DELETE FROM gadgets")
    export_tenant(backend, t.id, tmp_path / "b.ptx", passphrase=PASS)
    assert (
        move_tenant(backend, t.id, StorageModel.SILO, actor="test", grace_s=0).to_model is StorageModel.SILO
    )


def test_default_scrypt_cost_and_multi_segment_bundles(
    monkeypatch: pytest.MonkeyPatch,
    client: TestClient,
    make_tenant: Any,
    runtime: Runtime,
    backend: SqlBackend,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(_bundle, "SCRYPT_N", 2**17)
    monkeypatch.setattr(_bundle, "SEGMENT_BYTES", 1024)
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    noise = base64.b64encode(os.urandom(12_000)).decode()  # 16 KB that zlib cannot shrink much
    assert t.client.put("/v1/memory/big", json={"value": noise}, headers=t.h).status_code == 200
    before = snapshot(client, t.h)
    bundle = tmp_path / "acme.ptx"
    export_tenant(backend, t.id, bundle, passphrase=PASS)
    data = bundle.read_bytes()
    end = _header_end(data)
    header = json.loads(data[19:end])
    assert header["protection"] == {**header["protection"], "kdf": "scrypt", "n": 2**17, "r": 8, "p": 1}
    assert header["tenant"] == {"id": t.id, "name": "acme"}
    segment = 1024 + 16
    assert (len(data) - end) > 8 * segment

    swapped = (
        data[:end]
        + data[end + segment : end + 2 * segment]
        + data[end : end + segment]
        + data[end + 2 * segment :]
    )
    cut = data[: end + 3 * segment]  # whole segments, but the last one is not marked final
    for content in (swapped, cut):
        (tmp_path / "bad.ptx").write_bytes(content)
        with pytest.raises(BundleRejected) as e:
            import_tenant(backend, tmp_path / "bad.ptx", passphrase=PASS, name="x", actor="test")
        assert e.value.fields["reason"] == "authentication_failed"

    imported = import_tenant(backend, bundle, passphrase=PASS, name="acme-copy", actor="test")
    assert snapshot(client, new_key(runtime, imported.id)) == before


def test_export_refuses_bad_arguments(make_tenant: Any, backend: SqlBackend, tmp_path: Path) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    _, public = generate_recipient_keypair()
    path = tmp_path / "b.ptx"
    with pytest.raises(InvalidRequest):
        export_tenant(backend, t.id, path)
    with pytest.raises(InvalidRequest):
        export_tenant(backend, t.id, path, passphrase=PASS, recipient_public_key=public)
    with pytest.raises(InvalidRequest):
        export_tenant(backend, t.id, path, passphrase="short")
    with pytest.raises(InvalidRequest):
        export_tenant(backend, t.id, path, recipient_public_key=b"not a key")
    path.write_bytes(b"keep me")
    with pytest.raises(InvalidRequest):
        export_tenant(backend, t.id, path, passphrase=PASS)
    assert path.read_bytes() == b"keep me"
    export_tenant(backend, t.id, path, passphrase=PASS, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-bridge"], indirect=True)
def test_import_failing_halfway_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
    make_tenant: Any,
    runtime: Runtime,
    backend: SqlBackend,
    deployment: Deployment,
    tmp_path: Path,
) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    bundle = tmp_path / "acme.ptx"
    export_tenant(backend, t.id, bundle, passphrase=PASS)
    live = {x["id"] for x in backend.list_tenants()}
    real = _import._import_row
    written: list[str] = []

    def failing(kind: str, row: Any) -> Any:
        if kind == "memory":  # agents and runs are already in the database by now
            raise StorageError("disk full (simulated)")
        written.append(kind)
        return real(kind, row)

    monkeypatch.setattr(_import, "_import_row", failing)
    with pytest.raises(StorageError):
        import_tenant(
            backend, bundle, passphrase=PASS, name="acme-copy", actor="test", manager=runtime.tenants
        )

    assert "agent" in written and "run" in written
    assert {x["id"] for x in backend.list_tenants()} == live
    (gone,) = [x for x in backend.list_tenants(include_deleted=True) if x["id"] not in live]
    assert gone["state"] == "deleted" and gone["keys_destroyed_at"] is not None
    rows = count_tenant_rows(deployment, gone["id"])
    assert sum(rows.values()) == 0, rows  # no rows anywhere, no schema / database / file
    # The name is free again.
    monkeypatch.setattr(_import, "_import_row", real)
    assert import_tenant(backend, bundle, passphrase=PASS, name="acme-copy", actor="test").name == "acme-copy"


# -- moves -----------------------------------------------------------------------------


def _reading_progress(
    client: TestClient, t: TenantHandle, backend: SqlBackend, to: StorageModel, before: dict[str, Any]
) -> tuple[Callable[[int, int], None], list[int]]:
    """A progress callback that reads (served) and writes (held) through the API mid-move."""
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        assert backend.get_tenant(t.id)["moving_to"] == to.value
        assert client.get("/v1/memory/k0", headers=t.h).json()["value"] == before["memory"]["k0"]
        assert snapshot(client, t.h) == before
        held = client.put("/v1/memory/k0", json={"value": "written mid-move"}, headers=t.h)
        assert held.status_code == 503 and held.json()["error"]["code"] == "tenant_moving", held.text
        assert held.headers["Retry-After"]
        calls.append(done)

    return progress, calls


def _move_and_check(
    client: TestClient,
    t: TenantHandle,
    backend: SqlBackend,
    deployment: Deployment,
    to: StorageModel,
    before: dict[str, Any],
) -> dict[str, int]:
    progress, calls = _reading_progress(client, t, backend, to, before)
    summary = move_tenant(backend, t.id, to, actor="test", progress=progress, grace_s=0)
    assert calls, "reads were checked while the move was in progress"
    assert summary.to_model is to and summary.verified_samples > 0
    row = backend.get_tenant(t.id)
    assert row["storage_model"] == to.value and row["moving_to"] is None
    assert snapshot(client, t.h) == before  # the same key, the new placement
    assert actions(client, t.h)[-1] == "tenant.move"
    # Writes flow again, to the new placement (then put back for the next move).
    for value in ("after the move", before["memory"]["k0"]):
        assert client.put("/v1/memory/k0", json={"value": value}, headers=t.h).status_code == 200
        assert client.get("/v1/memory/k0", headers=t.h).json()["value"] == value
    return count_tenant_rows(deployment, t.id)


def test_move_pool_to_silo_and_back_on_sqlite(
    client: TestClient, make_tenant: Any, backend: SqlBackend, deployment: Deployment
) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    bystander = make_tenant("other", "pro", UNLIMITED)
    populate(t)
    populate(bystander)
    before, theirs = snapshot(client, t.h), snapshot(client, bystander.h)

    rows = _move_and_check(client, t, backend, deployment, StorageModel.SILO, before)
    assert rows["<file>"] == 1 and data_rows(rows, "silo:") > 0
    assert data_rows(rows) == data_rows(rows, "silo:"), rows  # nothing left in the shared tables
    assert rows["tenant_keys"] == 1 and rows["api_keys"] == 1  # control plane stays shared

    rows = _move_and_check(client, t, backend, deployment, StorageModel.POOL, before)
    assert "<file>" not in rows and data_rows(rows) > 0
    assert snapshot(client, bystander.h) == theirs


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_move_pool_to_bridge_to_silo_to_pool_on_postgres(
    client: TestClient, make_tenant: Any, backend: SqlBackend, deployment: Deployment
) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    bystander = make_tenant("other", "pro", UNLIMITED)
    populate(t)
    populate(bystander)
    before, theirs = snapshot(client, t.h), snapshot(client, bystander.h)

    rows = _move_and_check(client, t, backend, deployment, StorageModel.BRIDGE, before)
    assert rows["<schema>"] == 1 and "<database>" not in rows
    assert data_rows(rows, t.id + ".") > 0 and data_rows(rows, "public.") == 0, rows

    rows = _move_and_check(client, t, backend, deployment, StorageModel.SILO, before)
    assert "<schema>" not in rows and rows["<database>"] == 1
    assert data_rows(rows, "silo:") > 0 and data_rows(rows, "public.") == 0, rows

    rows = _move_and_check(client, t, backend, deployment, StorageModel.POOL, before)
    assert "<schema>" not in rows and "<database>" not in rows and data_rows(rows, "public.") > 0
    assert snapshot(client, bystander.h) == theirs


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_move_out_of_a_postgres_silo_another_process_has_connections_to(
    client: TestClient, make_tenant: Any, backend: SqlBackend, deployment: Deployment, kek_url: str
) -> None:
    """The old silo database is dropped by the owner role while the other servers and
    workers still hold application-role connections to it (their silo engines' pools)."""
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    before = snapshot(client, t.h)
    move_tenant(backend, t.id, StorageModel.SILO, actor="test", grace_s=0)
    other = open_backend(
        deployment.db_url, owner_url=deployment.owner_url, key_provider=key_provider_from_url(kek_url)
    )
    try:
        assert other.acting_on(t.id).memory_list() == ["k0", "k1", "k2"]  # a kept silo connection
        summary = move_tenant(backend, t.id, StorageModel.POOL, actor="test", grace_s=0)
        assert StorageModel.SILO in summary.shredded
        assert "<database>" not in count_tenant_rows(deployment, t.id)
        assert snapshot(client, t.h) == before
    finally:
        other.close()


def test_a_failed_move_leaves_the_tenant_where_it_was(
    monkeypatch: pytest.MonkeyPatch,
    client: TestClient,
    make_tenant: Any,
    backend: SqlBackend,
    deployment: Deployment,
) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    before = snapshot(client, t.h)

    def fail(*args: Any) -> int:
        raise TenantMoveFailed("simulated", tenant_id=t.id, reason="verification_failed")

    monkeypatch.setattr(_move, "_verify_copy", fail)
    with pytest.raises(TenantMoveFailed):
        move_tenant(backend, t.id, StorageModel.SILO, actor="test", grace_s=0)

    row = backend.get_tenant(t.id)
    assert row["storage_model"] == "pool" and row["moving_to"] is None
    rows = count_tenant_rows(deployment, t.id)
    assert "<file>" not in rows
    assert snapshot(client, t.h) == before
    audit = client.get("/v1/audit", params={"limit": 500}, headers=t.h).json()
    assert audit[-1]["action"] == "tenant.move" and audit[-1]["outcome"] == "failed"


def _unfinished_run(backend: SqlBackend, t: TenantHandle, agent: str, status: str) -> str:
    row = backend.acting_on(t.id).create_run(
        {
            "agent_id": agent,
            "principal": t.key_id,
            "mode": "async",
            "status": status,
            "input": f"{MARK} still going",
            "model": "simulated:instant",
            "simulated": 1,
            "input_tokens": 0,
            "output_tokens": 0,
            "tool_calls": 0,
        }
    )
    return str(row["id"])


def _enqueue(backend: SqlBackend, tenant_id: str, run_id: str) -> None:
    """An unclaimed entry in the durable run queue (other columns: zero values)."""
    q = schema.run_queue
    values: dict[str, Any] = {"tenant_id": tenant_id, "run_id": run_id, "enqueued_at": utcnow()}
    for c in q.columns:
        if c.name not in values and not c.nullable:
            values[c.name] = "" if isinstance(c.type, String) else 0
    with backend.engine.begin() as conn:
        conn.execute(insert(q).values(**values))


def test_a_move_waits_for_runs_in_flight_then_gives_up(
    client: TestClient, make_tenant: Any, backend: SqlBackend, deployment: Deployment
) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    agent = client.get("/v1/agents", headers=t.h).json()[0]["id"]
    running = _unfinished_run(backend, t, agent, "running")
    with pytest.raises(TenantMoveFailed) as e:
        move_tenant(backend, t.id, StorageModel.SILO, actor="test", drain_timeout_s=0.2, grace_s=0)
    assert e.value.fields["reason"] == "runs_in_flight" and e.value.fields["runs"] == 1
    assert backend.get_tenant(t.id)["moving_to"] is None
    assert "<file>" not in count_tenant_rows(deployment, t.id)

    # Once it finished, a run waiting unclaimed in the durable queue does not hold the move
    # (the queue hands out no run of a moving tenant); it moves along, still queued.
    backend.acting_on(t.id).update_run(running, {"status": "succeeded", "finished_at": utcnow()})
    waiting = _unfinished_run(backend, t, agent, "queued")
    _enqueue(backend, t.id, waiting)
    move_tenant(backend, t.id, StorageModel.SILO, actor="test", drain_timeout_s=0.2, grace_s=0)
    moved = client.get(f"/v1/runs/{waiting}", headers=t.h).json()
    assert moved["status"] == "queued" and moved["input"] == f"{MARK} still going"


def test_interrupted_moves_resume_or_abort(
    monkeypatch: pytest.MonkeyPatch,
    client: TestClient,
    make_tenant: Any,
    backend: SqlBackend,
    deployment: Deployment,
) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    populate(t)
    before = snapshot(client, t.h)

    # A crash before the switch: moving_to set, a partial silo file.
    backend.update_tenant(t.id, {"moving_to": "silo"})
    backend.placements.provision(t.id, StorageModel.SILO)
    assert snapshot(client, t.h) == before  # reads go on from the old placement
    assert abort_move(backend, t.id, actor="test") is True
    assert backend.get_tenant(t.id)["moving_to"] is None
    assert "<file>" not in count_tenant_rows(deployment, t.id)
    assert abort_move(backend, t.id, actor="test") is False

    backend.update_tenant(t.id, {"moving_to": "silo"})
    backend.placements.provision(t.id, StorageModel.SILO)
    summary = move_tenant(backend, t.id, StorageModel.SILO, actor="test", grace_s=0)
    assert summary.resumed and backend.get_tenant(t.id)["storage_model"] == "silo"
    assert snapshot(client, t.h) == before

    # A crash after the switch, before the old copy is shredded.
    real = _move._remove_copy

    def crash_on_shred(b: SqlBackend, tid: str, model: StorageModel) -> None:
        if model is StorageModel.SILO:
            raise KeyboardInterrupt
        real(b, tid, model)

    monkeypatch.setattr(_move, "_remove_copy", crash_on_shred)
    with pytest.raises(KeyboardInterrupt):
        move_tenant(backend, t.id, StorageModel.POOL, actor="test", grace_s=0)
    monkeypatch.setattr(_move, "_remove_copy", real)
    rows = count_tenant_rows(deployment, t.id)
    assert backend.get_tenant(t.id)["storage_model"] == "pool" and rows["<file>"] == 1  # stale copy
    summary = move_tenant(backend, t.id, StorageModel.POOL, actor="test", grace_s=0)
    assert summary.resumed and StorageModel.SILO in summary.shredded
    assert "<file>" not in count_tenant_rows(deployment, t.id)
    assert snapshot(client, t.h) == before


def test_move_refuses_what_it_cannot_do(make_tenant: Any, backend: SqlBackend, runtime: Runtime) -> None:
    t = make_tenant("acme", "pro", UNLIMITED)
    with pytest.raises(InvalidRequest):
        move_tenant(backend, t.id, StorageModel.BRIDGE, actor="test")  # no bridge on SQLite
    backend.update_tenant(t.id, {"moving_to": "silo"})
    with pytest.raises(InvalidTransition):
        move_tenant(backend, t.id, StorageModel.POOL, actor="test")
    backend.update_tenant(t.id, {"moving_to": None})
    TenantManager(backend).delete(t.id, actor="test")
    with pytest.raises(TenantNotFound):
        move_tenant(backend, t.id, StorageModel.SILO, actor="test")


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_run_attempts_travel_with_their_runs(
    client: TestClient, make_tenant: Any, runtime: Runtime, backend: SqlBackend, tmp_path: Path
) -> None:
    """A queued run's attempts (who executed it, when, how it ended) are the tenant's data:
    an export carries them into the imported tenant, and a move to another storage model
    takes them along (instead of refusing the tenant, or leaving them behind)."""
    t = make_tenant("acme", "pro", UNLIMITED)
    agent = t.agent("worker-run", tools=["calculator"])
    r = t.run(agent, '/call calculator {"expression": "6*7"}', output_tokens=3, mode="async")
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    deadline = time.monotonic() + 60  # a guard against a hang, not a measurement
    while (run := client.get(f"/v1/runs/{run_id}", headers=t.h).json())["status"] != "succeeded":
        assert time.monotonic() < deadline, run
        time.sleep(0.02)
    assert run["attempts"] == 1 and run["attempt_history"][0]["holder"].startswith("worker:")
    history = run["attempt_history"]

    bundle = tmp_path / "acme.ptx"
    summary = export_tenant(backend, t.id, bundle, passphrase=PASS)
    assert summary.counts["attempt"] == 1
    imported = import_tenant(backend, bundle, passphrase=PASS, name="acme-2", actor="test")
    got = client.get(f"/v1/runs/{run_id}", headers=new_key(runtime, imported.id)).json()
    assert got["attempt_history"] == history

    move_tenant(backend, t.id, StorageModel.SILO, actor="test", grace_s=0)
    assert client.get(f"/v1/runs/{run_id}", headers=t.h).json()["attempt_history"] == history
