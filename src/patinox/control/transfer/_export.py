"""Export: everything a tenant owns, written to one sealed bundle file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from patinox.control.transfer._bundle import (
    _KIND_TABLES,
    FORMAT_VERSION,
    _BundleWriter,
    _seal_for_export,
    _start_bundle,
)
from patinox.control.transfer._tables import Progress, _data_tables
from patinox.errors import InvalidRequest, InvalidTransition
from patinox.storage import AnyRow, ApiKeyRecord, SqlBackend, TenantRecord, TenantStore, utcnow
from patinox.tenancy import StorageModel, TenantState

_T = TypeVar("_T")
#: Tenant row fields the manifest carries.
_MANIFEST_TENANT = (
    "id",
    "name",
    "plan",
    "state",
    "isolation_level",
    "storage_model",
    "limit_overrides",
    "created_at",
)
#: API key fields a bundle lists (never the hash or prefix).
_KEY_FIELDS = ("id", "name", "scopes", "created_at", "revoked_at")


@dataclass(frozen=True, kw_only=True)
class ExportSummary:
    """What :func:`export_tenant` wrote.

    Attributes:
        path: the bundle file (mode 0600).
        tenant_id: the exported tenant's id.
        tenant_name: its name at export.
        exported_at: when the export started, UTC.
        counts: records per bundle record type (``agent``, ``run``, ``attempt``, ``memory``,
            ``usage``, ``audit``, ``api_key``).
        records: all records in the body (the sum of ``counts``).
        size_bytes: size of the bundle file, bytes.
        body_sha256: hex SHA-256 of the body (also inside the sealed body).
        protection: ``"passphrase"`` or ``"x25519"``.
    """

    path: Path
    tenant_id: str
    tenant_name: str
    exported_at: datetime
    counts: dict[str, int]
    records: int
    size_bytes: int
    body_sha256: str
    protection: str


@dataclass
class _Exported:
    """What an export wrote so far that later record types refer to."""

    agents: set[str] = field(default_factory=set)
    #: The greatest run id written (ids grow with time: a run made after the runs were
    #: read has a greater one).
    last_run: str = ""


def _export_rows(store: TenantStore, kind: str, exported: _Exported) -> Iterator[AnyRow]:
    """The rows of one record type, payloads decrypted, ready for JSON."""
    table = _KIND_TABLES[kind].name
    for page in store.bulk().pages(table, opened=True, with_run_agent=kind == "attempt"):
        for row in page:
            row.pop("tenant_id", None)
            if kind == "agent":
                exported.agents.add(row["id"])
            if kind == "run":
                if row["agent_id"] not in exported.agents:
                    continue  # its agent was created after the agents were read: not in this bundle
                exported.last_run = max(exported.last_run, row["id"])
            if kind == "idempotency_key" and row["state"] != "done":
                continue  # its request had not finished: nothing to replay, and no one to finish it
            if kind == "attempt":
                agent_id = row.pop("run_agent_id")
                if agent_id not in exported.agents or row["run_id"] > exported.last_run:
                    continue  # its run is not in this bundle
            yield row


def _exportable(backend: SqlBackend, tenant_id: str, target: Path, overwrite: bool) -> TenantRecord:
    """The tenant row, once the tenant and the target path are fit for an export.

    Raises:
        TenantNotFound: no such tenant.
        InvalidTransition: the tenant is being deleted.
        InvalidRequest: ``target`` exists and ``overwrite`` is false.
    """
    tenant = backend.get_tenant(tenant_id)
    if tenant["state"] not in (TenantState.ACTIVE.value, TenantState.SUSPENDED.value):
        raise InvalidTransition(
            f"cannot export a tenant that is {tenant['state']}", tenant_id=tenant_id, state=tenant["state"]
        )
    if target.exists() and not overwrite:
        raise InvalidRequest(f"{target} exists; choose another path or overwrite it", field="path")
    return tenant


def _manifest(
    backend: SqlBackend, tenant: TenantRecord, model: StorageModel, exported_at: datetime
) -> dict[str, Any]:
    columns: Mapping[str, Any] = tenant  # read by name from the list above
    return {
        "type": "manifest",
        "format": FORMAT_VERSION,
        "exported_at": exported_at,
        "tenant": {k: columns[k] for k in _MANIFEST_TENANT},
        "source": {"database": backend.engine.dialect.name, "storage_model": model.value},
    }


def _write_records(
    writer: _BundleWriter,
    store: TenantStore,
    keys: list[ApiKeyRecord],
    total: int,
    progress: Progress | None,
    *,
    include_secrets: bool = False,
) -> int:
    """Write every record after the manifest: the data tables' rows (the tenant's secrets
    only with ``include_secrets``), then the key list.

    Returns:
        Records written; ``progress(done, total)`` is called every 100 rows.
    """
    done = 0
    exported = _Exported()
    for kind in _exported_kinds(include_secrets):
        for row in _export_rows(store, kind, exported):
            writer.record({"type": kind, "row": row})
            done += 1
            if progress is not None and done % 100 == 0:
                progress(done, max(total, done))
    for key in keys:
        fields: Mapping[str, Any] = key  # read by name from the list above
        writer.record({"type": "api_key", "row": {f: fields[f] for f in _KEY_FIELDS}})
        done += 1
    return done


def _exported_kinds(include_secrets: bool) -> list[str]:
    """The record types an export writes: every one, but ``secret`` only when asked."""
    return [kind for kind in _KIND_TABLES if include_secrets or kind != "secret"]


def _write_atomically(target: Path, write: Callable[[IO[bytes]], _T]) -> _T:
    """Run ``write`` on a new file beside ``target`` (mode 0600 from creation), sync it,
    then rename it over ``target``; on any failure remove it, so ``target`` never holds a
    partial file.

    Raises:
        InvalidRequest: the directory cannot be written.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as err:
        raise InvalidRequest(f"cannot write in {target.parent}: {err.strerror}", field="path") from err
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            result = write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def export_tenant(
    backend: SqlBackend,
    tenant_id: str,
    path: str | os.PathLike[str],
    *,
    passphrase: str | None = None,
    recipient_public_key: bytes | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    include_secrets: bool = False,
    actor: str = "operator",
) -> ExportSummary:
    """Write everything ``tenant_id`` owns to one encrypted bundle file (format in the package docstring).

    The file is written under a temporary name in the same directory (mode 0600 from
    creation) and renamed into place only when complete, so ``path`` never holds a
    partial bundle. The export reads live data table by table; for a point-in-time copy
    of a busy tenant, suspend it (or export during a move) first.

    Args:
        backend: the deployment's control-plane store.
        tenant_id: the tenant to export (active or suspended).
        path: the bundle file to write.
        passphrase: seal with a key derived from this passphrase (at least 8 characters) ...
        recipient_public_key: ... or for this X25519 public key (32 raw bytes, or PEM/DER
            SubjectPublicKeyInfo, e.g. from :func:`generate_recipient_keypair`). Exactly one.
        progress: called as ``progress(rows_done, rows_total)`` (rows of the tenant's tables).
        overwrite: replace an existing file at ``path``.
        include_secrets: also carry the tenant's secrets (``secret`` records, values in
            plaintext inside the sealed body, as run payloads travel). Left out by default;
            when given, the tenant's audit log records ``secrets.export`` (by ``actor``,
            naming the secrets, never their values) before anything is written.
        actor: who exports, for that audit record.

    Returns:
        What was written.

    Raises:
        InvalidRequest: not exactly one of passphrase/recipient key, a short passphrase, a
            malformed key, ``path`` exists (without ``overwrite``) or cannot be written.
        TenantNotFound: no such tenant.
        InvalidTransition: the tenant is being deleted.
        OperationFailed: the tenant has rows in a table this build cannot carry
            (``reason="unknown_table"``).
        DecryptionFailed: a stored payload failed authentication.
        StorageError: the database failed.
    """
    protection, key = _seal_for_export(passphrase, recipient_public_key)
    target = Path(path)
    tenant = _exportable(backend, tenant_id, target, overwrite)
    model = StorageModel(tenant["storage_model"])
    store = backend.acting_on(tenant_id)
    _data_tables(backend, tenant_id, model)  # refuses rows in tables it cannot carry
    keys = backend.list_api_keys(tenant_id)
    rows = store.bulk()
    kinds = _exported_kinds(include_secrets)
    total = sum(rows.count(_KIND_TABLES[k].name) for k in kinds) + len(keys)
    if include_secrets:
        names = [info.name for info in store.secrets().list()]
        store.append_audit(
            actor=actor, action="secrets.export", target=str(target), outcome="ok", detail={"secrets": names}
        )
    exported_at = utcnow()
    manifest = _manifest(backend, tenant, model, exported_at)

    def write(out: IO[bytes]) -> tuple[_BundleWriter, int, str]:
        writer = _start_bundle(
            out,
            key=key,
            tenant_id=tenant_id,
            tenant_name=tenant["name"],
            exported_at=exported_at,
            protection=protection,
        )
        writer.record(manifest)
        done = _write_records(writer, store, keys, total, progress, include_secrets=include_secrets)
        return writer, done, writer.close()

    writer, done, digest = _write_atomically(target, write)
    if progress is not None:
        progress(done, done)
    return ExportSummary(
        path=target,
        tenant_id=tenant_id,
        tenant_name=tenant["name"],
        exported_at=exported_at,
        counts=dict(writer.counts),
        records=done,
        size_bytes=target.stat().st_size,
        body_sha256=digest,
        protection=str(protection["kind"]),
    )
