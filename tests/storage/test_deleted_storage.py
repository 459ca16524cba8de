"""Nothing re-creates a deleted tenant's schema, database or file.

Only provisioning at creation (or a move) makes a tenant's own storage; every other path
opens what exists or fails. Before this held, a late reader of a deleted SQLite silo
tenant (an operator view, a stale tenant context, another process's engine) re-created an
empty database file for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from patinox.control import TenantManager, TenantSpec
from patinox.errors import StorageError, TenantNotFound
from patinox.storage import SqlBackend, open_backend
from patinox.storage.crypto import key_provider_from_url
from patinox.storage.engine import head_revision
from patinox.tenancy import StorageModel, TenantContext
from tests._contexts import tenant_context
from tests.conftest import Deployment, count_tenant_rows

SEPARATE = ("sqlite-silo", "pg-bridge", "pg-silo")


def _ctx(tenant_id: str, model: StorageModel) -> TenantContext:
    return tenant_context(tenant_id, storage_model=model)


@pytest.fixture
def other(deployment: Deployment, backend: SqlBackend, kek_url: str) -> Iterator[SqlBackend]:
    """A second backend on the same deployment: another server process's view of it."""
    b = open_backend(
        deployment.db_url, owner_url=deployment.owner_url, key_provider=key_provider_from_url(kek_url)
    )
    yield b
    b.close()


@pytest.mark.parametrize("deployment", SEPARATE, indirect=True)
def test_no_path_re_creates_a_deleted_tenants_storage(
    backend: SqlBackend, other: SqlBackend, deployment: Deployment, tmp_path: Path
) -> None:
    model = StorageModel(deployment.storage_model)
    manager = TenantManager(backend)
    tenant = manager.create(TenantSpec(name="alpha", storage_model=model), actor="test")
    ctx = _ctx(tenant.id, model)
    backend.tenant_store(ctx).memory_put("k", "v")
    assert other.tenant_store(ctx).memory_list() == ["k"]  # its engine is cached, connected
    manager.delete(tenant.id, actor="test")
    assert set(count_tenant_rows(deployment, tenant.id).values()) == {0}

    for b in (backend, other):
        with pytest.raises(TenantNotFound):
            b.acting_on(tenant.id)
        with pytest.raises(TenantNotFound):
            b.usage_summary(tenant.id)
        with pytest.raises(TenantNotFound):
            b.list_audit(tenant.id)
        stale = b.tenant_store(ctx)  # a context taken before the deletion
        with pytest.raises(StorageError):
            stale.memory_list()
        with pytest.raises(StorageError):  # a write that needs no key: nothing sealed
            stale.append_audit(actor="key_x", action="late", target=None, outcome="ok")
        if model is StorageModel.SILO and not deployment.postgres:
            assert b.placements.upgrade(tenant.id, model, head_revision()) is False
        else:
            with pytest.raises(StorageError):
                b.placements.upgrade(tenant.id, model, head_revision())
        assert set(count_tenant_rows(deployment, tenant.id).values()) == {0}, b
    if not deployment.postgres:
        assert sorted(p.name for p in (tmp_path / "tenants").iterdir() if p.name.startswith(tenant.id)) == []


@pytest.mark.parametrize("deployment", ["sqlite-silo"], indirect=True)
def test_a_silo_file_is_private_from_its_creation(backend: SqlBackend, tmp_path: Path) -> None:
    spec = TenantSpec(name="alpha", storage_model=StorageModel.SILO)
    tenant = TenantManager(backend).create(spec, actor="test")
    assert (tmp_path / "tenants" / f"{tenant.id}.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool", "pg-bridge"], indirect=True)
def test_deletion_drops_a_copy_a_move_made_under_another_storage_model(
    backend: SqlBackend, deployment: Deployment
) -> None:
    """A move between storage models that switched the tenant (or crashed holding its new
    copy) while a deletion ran: the deletion, having read the old model, dropped only that
    placement and left the tenant's new schema, database or file behind. Deletion drops the
    tenant's own storage under every model the deployment offers."""
    model = StorageModel(deployment.storage_model)
    manager = TenantManager(backend)
    tenant = manager.create(TenantSpec(name="alpha", storage_model=model), actor="test")
    for other in sorted(backend.placements.supported() - {model, StorageModel.POOL}):
        backend.placements.provision(tenant.id, other)  # the move's copy
    manager.delete(tenant.id, actor="test")
    assert set(count_tenant_rows(deployment, tenant.id).values()) == {0}
