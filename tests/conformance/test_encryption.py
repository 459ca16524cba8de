"""Envelope encryption and crypto-shredding, on every storage deployment.

Payloads (agent memory values, run inputs and outputs) are stored only as AES-256-GCM
ciphertext under the tenant's DEK; the AAD binds each to tenant, column and row.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text, update

from patinox.errors import DecryptionFailed, TenantKeysDestroyed
from patinox.storage import SqlBackend, open_backend
from patinox.storage import _schema as schema
from patinox.storage.crypto import key_provider_from_url
from patinox.storage.engine import database_name, normalise_url, with_database
from patinox.tenancy import TenantContext
from tests._contexts import tenant_context
from tests.conftest import Deployment, auth, raw_db_bytes

MARKERS = ("memory-plaintext-marker", "run-input-plaintext-marker")


def _all_stored_text(deployment: Deployment, tenant_id: str) -> bytes:
    """Everything the storage holds: SQLite files byte for byte; on PostgreSQL every row of
    every table in every schema of the main and the tenant's silo database, read as a
    superuser (no row-level security), as text."""
    if not deployment.postgres:
        out = raw_db_bytes(deployment.db_url)
        silo = deployment.db_url.removeprefix("sqlite:///").rsplit("/", 1)[0] + f"/tenants/{tenant_id}.db"
        return out + raw_db_bytes("sqlite:///" + silo)
    admin_url = deployment.admin_url
    dbname = database_name(deployment.db_url)
    assert admin_url is not None and dbname is not None
    out = b""
    for db in (dbname, f"{dbname}_{tenant_id}"):
        eng = create_engine(normalise_url(with_database(admin_url, db)))
        try:
            with eng.connect() as conn:
                tables = conn.execute(
                    text(
                        "SELECT schemaname, tablename FROM pg_tables "
                        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
                    )
                ).all()
                for schema, table in tables:
                    for (row,) in conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t')):
                        out += row.encode()
        except Exception as err:  # the silo database exists only for silo tenants
            if "does not exist" not in str(err):
                raise
        finally:
            eng.dispose()
    return out


def _seed(client: TestClient, make_tenant: Any) -> Any:
    a = make_tenant("alpha")
    agent = a.agent("x")
    assert client.put("/v1/memory/k1", json={"value": MARKERS[0]}, headers=a.h).status_code == 200
    r = a.run(agent, MARKERS[1], output_tokens=3)
    assert r.status_code == 200, r.text
    return a, r.json()["id"]


def test_no_plaintext_payload_in_storage(
    client: TestClient, make_tenant: Any, backend: SqlBackend, deployment: Deployment
) -> None:
    a, run_id = _seed(client, make_tenant)
    # Readable through the API...
    assert client.get("/v1/memory/k1", headers=a.h).json()["value"] == MARKERS[0]
    assert client.get(f"/v1/runs/{run_id}", headers=a.h).json()["input"] == MARKERS[1]
    # ...but nowhere in the stored bytes.
    stored = _all_stored_text(deployment, a.id)
    store = backend.tenant_store(_tenant_ctx(a.id, deployment.storage_model))
    with store._tx() as conn:
        m = schema.memory
        sealed = conn.execute(select(m.c.value).where(m.c.tenant_id == a.id, m.c.key == "k1")).scalar_one()
    # Positive control: the scan sees the ciphertext (raw in SQLite files, hex in PostgreSQL text).
    assert (b"\\x" + sealed.hex().encode() if deployment.postgres else sealed) in stored
    for marker in MARKERS:
        assert marker.encode() not in stored, marker


def _tenant_ctx(tenant_id: str, model: str) -> TenantContext:
    return tenant_context(tenant_id, storage_model=model, scopes=frozenset(), principal="test")


def _copy_memory_value(backend: SqlBackend, src: tuple[str, str], dst: tuple[str, str], model: str) -> None:
    """Copy the stored (encrypted) value of memory row ``src`` into row ``dst`` (tenant, key),
    as an attacker with write access to the database would."""
    s_store = backend.tenant_store(_tenant_ctx(src[0], model))
    d_store = backend.tenant_store(_tenant_ctx(dst[0], model))
    m = schema.memory
    with s_store._tx() as conn:
        value = conn.execute(select(m.c.value).where(m.c.tenant_id == src[0], m.c.key == src[1])).scalar_one()
    d_store.memory_put(dst[1], "placeholder")
    with d_store._tx() as conn:
        conn.execute(update(m).where(m.c.tenant_id == dst[0], m.c.key == dst[1]).values(value=value))


def test_ciphertext_moved_to_another_row_or_tenant_fails(
    client: TestClient, make_tenant: Any, backend: SqlBackend, deployment: Deployment
) -> None:
    a = make_tenant("alpha")
    b = make_tenant("beta")
    client.put("/v1/memory/k1", json={"value": "alpha secret"}, headers=a.h)
    model = deployment.storage_model
    _copy_memory_value(backend, (a.id, "k1"), (a.id, "k2"), model)  # another row, same tenant
    _copy_memory_value(backend, (a.id, "k1"), (b.id, "k1"), model)  # same key, another tenant
    for who, key in ((a, "k2"), (b, "k1")):
        r = client.get(f"/v1/memory/{key}", headers=who.h)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "decryption_failed"
        assert "alpha secret" not in r.text
    with pytest.raises(DecryptionFailed):
        backend.tenant_store(_tenant_ctx(b.id, model)).memory_get("k1")
    assert client.get("/v1/memory/k1", headers=a.h).json()["value"] == "alpha secret"


def test_after_delete_nothing_decrypts_and_a_new_tenant_sees_nothing(
    client: TestClient, make_tenant: Any, backend: SqlBackend, operator_key: str, deployment: Deployment
) -> None:
    a, _ = _seed(client, make_tenant)
    store = backend.tenant_store(_tenant_ctx(a.id, deployment.storage_model))
    with store._tx() as conn:
        m = schema.memory
        saved = conn.execute(select(m.c.key, m.c.value).where(m.c.tenant_id == a.id)).all()
    assert saved
    assert client.delete(f"/admin/tenants/{a.id}", headers=auth(operator_key)).status_code == 200
    with pytest.raises(TenantKeysDestroyed):
        backend.keyring.current_key(a.id)
    # Rows restored from a data-only backup do not decrypt: the DEK is gone.
    if deployment.storage_model == "pool":
        with backend.engine.begin() as conn:
            if deployment.postgres:
                conn.execute(text("SELECT set_config('patinox.tenant_id', :t, true)"), {"t": a.id})
            for key, value in saved:
                conn.execute(
                    text(
                        "INSERT INTO memory (tenant_id, key, value, updated_at) "
                        "VALUES (:t, :k, :v, CURRENT_TIMESTAMP)"
                    ),
                    {"t": a.id, "k": key, "v": value},
                )
        with pytest.raises(TenantKeysDestroyed):
            backend.tenant_store(_tenant_ctx(a.id, "pool")).memory_get(saved[0][0])
    a2 = make_tenant("alpha")
    assert a2.id != a.id
    assert client.get("/v1/memory", headers=a2.h).json() == []
    assert client.get("/v1/memory/k1", headers=a2.h).status_code == 404


def test_concurrent_first_writes_make_one_dek(
    client: TestClient, make_tenant: Any, deployment: Deployment, kek_url: str
) -> None:
    """Eight writers, each with its own backend (as separate processes would have), write
    the first payloads of a brand-new tenant at once: one DEK, every row readable."""
    a = make_tenant("alpha")
    backends = [
        open_backend(
            deployment.db_url, owner_url=deployment.owner_url, key_provider=key_provider_from_url(kek_url)
        )
        for _ in range(8)
    ]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            store = backends[i].tenant_store(_tenant_ctx(a.id, deployment.storage_model))
            barrier.wait()
            store.memory_put(f"k{i}", f"v{i}")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for b in backends:
        b.close()
    assert errors == []
    r = client.get("/v1/memory", headers=a.h)
    assert sorted(r.json()) == sorted(f"k{i}" for i in range(8))
    for i in range(8):
        assert client.get(f"/v1/memory/k{i}", headers=a.h).json()["value"] == f"v{i}"
