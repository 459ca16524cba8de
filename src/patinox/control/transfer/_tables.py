"""Which tables a transfer carries, and the tenant's store under a given storage model."""

from __future__ import annotations

from collections.abc import Callable

from patinox.control.transfer._bundle import _KIND_TABLES
from patinox.errors import OperationFailed
from patinox.storage import SqlBackend, TenantStore
from patinox.tenancy import StorageModel

#: Called as ``progress(done, total)``; the unit is given by each operation.
Progress = Callable[[int, int], None]
#: Tables of the shared database that hold per-tenant rows but belong to the control
#: plane: they stay in the shared database whatever the tenant's storage model, so a move
#: never copies them and an export never reads them as data.
CONTROL_PLANE_TABLES = frozenset(
    {"api_keys", "tenant_keys", "run_queue", "queue_tenants", "quota_ledger"}
    # The webhook outbox and its delivery log: not carried by an export (a delivery log is
    # the sending deployment's record; pending deliveries are not sent again after an
    # import), left in place by a move (delivery loops read the tenant's current placement).
    | {"webhook_deliveries", "webhook_attempts"}
)
#: Run statuses of a run that has not finished.
_UNFINISHED = ("queued", "running")


def _store_at(backend: SqlBackend, tenant_id: str, model: StorageModel) -> TenantStore:
    """A store of ``tenant_id`` bound to the placement of ``model`` (not necessarily its current one)."""
    return backend.acting_on_model(tenant_id, model)


def _data_tables(backend: SqlBackend, tenant_id: str, model: StorageModel) -> list[str]:
    """The names of the tenant data tables of the ``model`` placement, parents first.

    The placement's catalog is read for every table with a ``tenant_id`` column. Control
    plane tables are left out; the known data tables (agents, runs, memory, usage, audit)
    are returned. A table that is neither known nor control plane is checked instead: if it
    holds rows of the tenant, the transfer is refused rather than silently leaving them
    behind (or, worse, moving a control-plane table a later build added out of the shared
    database). Teach this package the table (in the bundle's record types or in
    :data:`CONTROL_PLANE_TABLES`).

    Raises:
        OperationFailed: an unknown table holds rows of the tenant (``reason="unknown_table"``).
    """
    placement = backend.placements.for_tenant(tenant_id, model)
    found = set(backend.tenant_owned_tables(placement.engine, placement.schema)) - CONTROL_PLANE_TABLES
    known = [t.name for t in _KIND_TABLES.values() if t.name in found]
    rows = _store_at(backend, tenant_id, model).bulk()
    for name in sorted(found - set(known)):
        if rows.count(name):
            raise OperationFailed(
                f"table {name!r} holds rows of this tenant, and this build does not know whether it is "
                "tenant data or control plane; refusing to export or move the tenant",
                reason="unknown_table",
                table=name,
                tenant_id=tenant_id,
            )
    return known
