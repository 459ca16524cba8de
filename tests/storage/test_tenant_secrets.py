"""One tenant's secrets (:class:`patinox.storage.TenantSecrets`): sealed under the tenant's
DEK, per tenant (row-level security on PostgreSQL), audited without their values,
unreadable after crypto-shredding, purged with the tenant."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, text

from patinox.control import TenantSpec
from patinox.errors import InvalidRequest, NotFound, TenantKeysDestroyed
from patinox.runtime import Runtime
from patinox.storage import TenantStore
from patinox.tenancy import StorageModel, TenantContext
from tests.conftest import ALL_DEPLOYMENTS, Deployment, count_tenant_rows, raw_db_bytes

CANARY = "sk-canary-7f3a9c1e5b2d4f60"


def store_of(runtime: Runtime, deployment: Deployment, name: str) -> TenantStore:
    t = runtime.tenants.create(
        TenantSpec(name=name, storage_model=StorageModel(deployment.storage_model)), actor="test"
    )
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    return runtime.backend.tenant_store(ctx)


@pytest.mark.parametrize("deployment", ALL_DEPLOYMENTS, indirect=True)
def test_set_rotate_read_delete_per_tenant(runtime: Runtime, deployment: Deployment) -> None:
    a, b = store_of(runtime, deployment, "alpha"), store_of(runtime, deployment, "beta")
    info, rotated = a.secrets().put("provider:openai", CANARY, actor="k1")
    assert (info.name, info.version, rotated) == ("provider:openai", 1, False)
    info, rotated = a.secrets().put("provider:openai", CANARY + "-2", actor="k1")
    assert (info.version, rotated) == (2, True)
    assert [s.name for s in a.secrets().list()] == ["provider:openai"]
    assert a.secrets().value("provider:openai", actor="run", purpose="model:openai:x") == CANARY + "-2"
    # The other tenant neither sees nor reads it, and answers as for a missing name.
    assert b.secrets().list() == [] and not b.secrets().exists("provider:openai")
    with pytest.raises(NotFound):
        b.secrets().value("provider:openai", actor="run", purpose="x")
    with pytest.raises(NotFound):
        b.secrets().delete("provider:openai", actor="k2")
    a.secrets().delete("provider:openai", actor="k1")
    assert not a.secrets().exists("provider:openai")
    with pytest.raises(NotFound):
        a.secrets().delete("provider:openai", actor="k1")
    audit = [(r["action"], r["target"], r["detail"]) for r in a.list_audit()]
    assert ("secret.set", "provider:openai", {"version": 1}) in audit
    assert ("secret.rotate", "provider:openai", {"version": 2}) in audit
    assert ("secret.use", "provider:openai", {"version": 2, "purpose": "model:openai:x"}) in audit
    assert ("secret.delete", "provider:openai", {}) in audit
    assert CANARY not in repr(a.list_audit())
    assert b.list_audit() == [] or all(not r["action"].startswith("secret.") for r in b.list_audit())


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo", "pg-pool"], indirect=True)
def test_a_value_is_stored_sealed(runtime: Runtime, deployment: Deployment, db_url: str) -> None:
    store = store_of(runtime, deployment, "alpha")
    store.secrets().put("token", CANARY, actor="k")
    (row,) = [r for page in store.bulk().pages("secrets") for r in page]
    assert isinstance(row["value"], bytes) and CANARY.encode() not in row["value"]
    if not deployment.postgres:
        assert CANARY.encode() not in raw_db_bytes(db_url)


@pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)
def test_bad_names_and_values_are_refused_without_quoting_them(
    runtime: Runtime, deployment: Deployment
) -> None:
    secrets = store_of(runtime, deployment, "alpha").secrets()
    for name in ("", "-x", "a b", "x" * 101, CANARY + "\n"):
        with pytest.raises(InvalidRequest) as err:
            secrets.put(name, "v", actor="k")
        assert CANARY not in str(err.value)
    for value in ("", "x" * (64 * 1024 + 1), CANARY + "\x00"):
        with pytest.raises(InvalidRequest) as err:
            secrets.put("ok", value, actor="k")
        assert CANARY not in str(err.value) and CANARY not in repr(err.value.fields)
    assert secrets.list() == []


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_row_level_security_hides_another_tenants_secrets(runtime: Runtime, deployment: Deployment) -> None:
    a, b = store_of(runtime, deployment, "alpha"), store_of(runtime, deployment, "beta")
    a.secrets().put("token", CANARY, actor="k")
    engine = create_engine(deployment.db_url)  # the application role, not the owner
    try:
        with engine.begin() as conn:
            assert conn.execute(text("SELECT current_user")).scalar() != "postgres"
            conn.execute(text("SELECT set_config('patinox.tenant_id', :t, true)"), {"t": b.tenant_id})
            assert conn.execute(text("SELECT count(*) FROM secrets")).scalar() == 0
            named = conn.execute(
                text("SELECT count(*) FROM secrets WHERE tenant_id = :a"), {"a": a.tenant_id}
            )
            assert named.scalar() == 0
        with engine.begin() as conn:
            conn.execute(text("SELECT set_config('patinox.tenant_id', :t, true)"), {"t": a.tenant_id})
            assert conn.execute(text("SELECT count(*) FROM secrets")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-bridge"], indirect=True)
def test_crypto_shredding_makes_secrets_unreadable_and_deletion_purges_them(
    runtime: Runtime, deployment: Deployment
) -> None:
    store = store_of(runtime, deployment, "alpha")
    store.secrets().put("token", CANARY, actor="k")

    def stored() -> int:
        return sum(
            n for table, n in count_tenant_rows(deployment, store.tenant_id).items() if "secrets" in table
        )

    assert stored() == 1
    runtime.backend.keyring.shred(store.tenant_id)
    with pytest.raises(TenantKeysDestroyed):
        store.secrets().value("token", actor="run", purpose="x")
    runtime.tenants.delete(store.tenant_id, actor="test")
    assert stored() == 0


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_concurrent_first_writes_of_one_name_make_one_secret_and_rotations(
    runtime: Runtime, deployment: Deployment
) -> None:
    store = store_of(runtime, deployment, "alpha")
    n = 8
    start = threading.Barrier(n)

    def put(i: int) -> bool:
        secrets = store.secrets()
        start.wait()  # every writer reaches the first write together
        return secrets.put("token", f"value-{i}", actor="k")[1]

    with ThreadPoolExecutor(n) as pool:
        rotated = sorted(pool.map(put, range(n)))
    assert rotated == [False] + [True] * (n - 1)
    (info,) = store.secrets().list()
    assert info.version == n
    actions = [r["action"] for r in store.list_audit() if r["target"] == "token"]
    assert sorted(actions) == ["secret.rotate"] * (n - 1) + ["secret.set"]


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-silo"], indirect=True)
def test_a_dek_rotation_reseals_secrets_under_the_new_key(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    store.secrets().put("token", CANARY, actor="k")
    (before,) = [r["value"] for page in store.bulk().pages("secrets") for r in page]
    runtime.backend.keyring.rotate_dek(store.tenant_id)
    assert store.reencrypt() == 1
    (after,) = [r["value"] for page in store.bulk().pages("secrets") for r in page]
    sealer = runtime.backend.acting_on(store.tenant_id)._sealer
    assert sealer.version(after) == sealer.version(before) + 1
    assert store.secrets().value("token", actor="k", purpose="check") == CANARY
