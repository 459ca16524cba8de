"""Import: a verified bundle recreated as a new tenant, under new ids and new data keys."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Table

from patinox.control.tenants import Tenant, TenantManager, TenantSpec
from patinox.control.transfer._bundle import _KIND_TABLES, _Body, _BundleReader, _one_secret
from patinox.control.transfer._tables import _UNFINISHED, Progress
from patinox.errors import InvalidRequest
from patinox.storage import AnyRow, SqlBackend, TenantStore, utcnow
from patinox.storage import schema as s
from patinox.tenancy import IsolationLevel, LimitOverrides, StorageModel, new_id

_BATCH = 500  # rows per statement / transaction


def _spec_from_manifest(
    manifest: Mapping[str, Any], name: str | None, storage_model: StorageModel | None
) -> TenantSpec:
    tenant = manifest["tenant"]
    try:
        return TenantSpec(
            name=name or tenant["name"],
            plan=tenant["plan"],
            isolation_level=IsolationLevel(tenant["isolation_level"]),
            storage_model=storage_model or StorageModel(tenant["storage_model"]),
            limits=LimitOverrides.from_stored(tenant.get("limit_overrides")),
        )
    except (ValidationError, ValueError) as err:
        raise InvalidRequest(f"the bundle's tenant cannot be created here: {err}", field="name") from err


def _is_datetime(table: Table, column: str) -> bool:
    return isinstance(table.c[column].type, s.UTCDateTime)


def _import_row(kind: str, row: Mapping[str, Any]) -> AnyRow:
    """A bundle row as a row of the new tenant: known columns only, payloads in plaintext
    (storage seals them, and sets the tenant id)."""
    table = _KIND_TABLES[kind]
    out: AnyRow = {}
    for column in table.columns:
        if column.name in ("tenant_id", "seq") or column.name not in row:
            continue
        value = row[column.name]
        if value is not None and _is_datetime(table, column.name):
            value = datetime.fromisoformat(value)
        out[column.name] = value
    if kind == "audit":
        out["id"] = new_id("au")  # audit ids are unique across the deployment
    if kind == "attempt" and out.get("outcome") is None:
        out["outcome"] = "interrupted"  # its run was exported unfinished (see below)
        out["ended_at"] = out.get("ended_at") or utcnow()
    if kind == "run" and out.get("status") in _UNFINISHED:
        out["status"] = "failed"
        out["finished_at"] = out.get("finished_at") or utcnow()
        out["error"] = {
            "code": "run_failed",
            "reason": "imported_unfinished",
            "message": "the run had not finished when its tenant was exported",
        }
    return out


def _write_bundle(
    reader: _BundleReader, store: TenantStore, progress: Callable[[int], None] | None
) -> dict[str, int]:
    """Second pass: write every record of the (already verified) bundle; returns rows per type."""
    rows = store.bulk()
    written: dict[str, int] = {}
    batch: list[AnyRow] = []
    batch_kind = ""

    def flush() -> None:
        if batch:
            rows.insert(_KIND_TABLES[batch_kind].name, batch, seal=True)
            written[batch_kind] = written.get(batch_kind, 0) + len(batch)
            batch.clear()

    for obj in reader.records(progress):
        kind = obj["type"]
        if kind not in _KIND_TABLES:
            continue  # manifest, api_key (informational), end
        if kind != batch_kind or len(batch) >= _BATCH:
            flush()
            batch_kind = kind
        batch.append(_import_row(kind, obj["row"]))
    flush()
    return written


def _fill(
    backend: SqlBackend,
    tenant_id: str,
    reader: _BundleReader,
    body: _Body,
    *,
    actor: str,
    progress: Callable[[int], None] | None,
) -> None:
    """Write the bundle's rows into the new tenant, then audit the import in its log."""
    store = backend.acting_on(tenant_id)
    written = _write_bundle(reader, store, progress)
    source = body.manifest["tenant"]
    store.append_audit(
        actor=actor,
        action="tenant.import",
        target=tenant_id,
        outcome="ok",
        detail={
            "source_tenant_id": source["id"],
            "source_name": source["name"],
            "exported_at": body.manifest.get("exported_at"),
            "body_sha256": body.sha256,
            "rows": written,
            "api_keys_not_carried": body.counts.get("api_key", 0),
        },
    )


def import_tenant(
    backend: SqlBackend,
    path: str | os.PathLike[str],
    *,
    passphrase: str | None = None,
    recipient_private_key: bytes | None = None,
    name: str | None = None,
    storage_model: StorageModel | None = None,
    actor: str,
    progress: Progress | None = None,
    manager: TenantManager | None = None,
) -> Tenant:
    """Recreate a bundle's tenant on this deployment, under a new id and new data keys.

    The whole bundle is read and verified first (every segment authenticated, the body's
    SHA-256 and record counts checked, every record's shape checked); only then is the
    tenant created, through :meth:`TenantManager.create`, and its rows written through
    its own placement, payloads sealed again with its own DEK. Agent, run and usage ids
    are kept (keys are per tenant, so they cannot collide), so runs keep pointing at their
    agents and usage at their runs; audit records get new ids. On any failure after
    creation the tenant is deleted again (:meth:`TenantManager.delete`: keys shredded,
    rows purged, placement dropped; a tombstone row remains) before the error is re-raised.
    No API key is carried: issue new keys for the imported tenant.

    Args:
        backend: the importing deployment's control-plane store.
        path: the bundle file.
        passphrase: for a passphrase bundle ...
        recipient_private_key: ... or the recipient's X25519 private key (32 raw bytes, or
            unencrypted PKCS#8 PEM/DER) for a recipient-key bundle. Exactly one.
        name: the new tenant's name; default the exported one (give another to import next
            to the original on the same deployment).
        storage_model: where to store it; default the exported tenant's model.
        actor: who imports, for the audit records.
        progress: called as ``progress(bytes_done, bytes_total)`` in bundle bytes; the
            bundle is read twice (verify, then write), so the total is twice its size.
        manager: the tenant manager to create (and on failure delete) the tenant with,
            so its listeners and supported isolation levels apply; default a plain one.

    Returns:
        The new tenant, ``active``.

    Raises:
        InvalidRequest: not exactly one secret, an unreadable file, a malformed key, or a
            tenant spec (plan, name, storage model) this deployment refuses.
        BundleRejected: wrong passphrase or key, a changed or truncated bundle, an
            unsupported format (nothing is created).
        AlreadyExists: a live tenant has that name (nothing is created).
        IsolationUnavailable: the bundle's isolation level is not enforceable here.
        StorageError: the database failed (the half-made tenant is deleted).
    """
    _one_secret(passphrase, recipient_private_key, ("passphrase", "recipient_private_key"))
    bundle = Path(path)
    reader = _BundleReader(bundle, passphrase=passphrase, recipient_private_key=recipient_private_key)
    total = 2 * reader.size
    body = reader.verify((lambda n: progress(n, total)) if progress is not None else None)
    spec = _spec_from_manifest(body.manifest, name, storage_model)
    backend.placements.require(spec.storage_model)
    manager = manager or TenantManager(backend)
    tenant = manager.create(spec, actor=actor)
    try:
        _fill(
            backend,
            tenant.id,
            reader,
            body,
            actor=actor,
            progress=(lambda n: progress(reader.size + n, total)) if progress is not None else None,
        )
    except BaseException as err:
        try:
            manager.delete(tenant.id, actor=actor)
        except Exception as cleanup:  # keep the original error; say the cleanup failed too
            err.add_note(f"deleting the half-imported tenant {tenant.id} failed too: {cleanup!r}")
        raise
    return manager.get(tenant.id)
