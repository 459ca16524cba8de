"""Online move of a tenant between storage models of one deployment."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from patinox.control.transfer._tables import _UNFINISHED, Progress, _data_tables, _store_at
from patinox.errors import InvalidTransition, OperationFailed, PatinoxError
from patinox.storage import SqlBackend, TenantStore
from patinox.tenancy import StorageModel, TenantState

#: Tenant states a move accepts.
_LIVE = (TenantState.ACTIVE.value, TenantState.SUSPENDED.value)


class TenantMoveFailed(OperationFailed):
    """A storage move stopped before its switch; the tenant stays where it was.

    Fields: ``tenant_id``, ``reason`` (``runs_in_flight``, ``verification_failed``,
    ``state_changed``) and details.
    """

    code = "move_failed"
    http_status = 503


@dataclass(frozen=True, kw_only=True)
class MoveSummary:
    """What :func:`move_tenant` did.

    Attributes:
        tenant_id: the moved tenant.
        from_model: its storage model before.
        to_model: its storage model now.
        rows: rows copied per table.
        verified_samples: payloads decrypted from the new placement after the copy.
        shredded: storage models whose copy of the tenant was removed afterwards.
        resumed: True when this call finished an interrupted move (before or after its switch).
        duration_s: wall time of the call, seconds.
    """

    tenant_id: str
    from_model: StorageModel
    to_model: StorageModel
    rows: dict[str, int] = field(default_factory=dict)
    verified_samples: int = 0
    shredded: tuple[StorageModel, ...] = ()
    resumed: bool = False
    duration_s: float = 0.0


def _delete_rows(backend: SqlBackend, tenant_id: str, model: StorageModel) -> dict[str, int]:
    """Delete the tenant's rows from every data table of the ``model`` placement (one transaction)."""
    tables = list(reversed(_data_tables(backend, tenant_id, model)))  # children first
    counts = _store_at(backend, tenant_id, model).bulk().delete_all(tables)
    if backend.engine.dialect.name == "sqlite" and model is StorageModel.POOL:
        # secure_delete zeroes freed pages; truncating the WAL drops older page images.
        backend.truncate_wal(tenant_id)
    return counts


def _remove_copy(backend: SqlBackend, tenant_id: str, model: StorageModel) -> None:
    """Remove the tenant's copy in ``model``: its rows (pool) or its schema/database/file."""
    if model is StorageModel.POOL:
        _delete_rows(backend, tenant_id, model)
    else:
        backend.placements.destroy(tenant_id, model)


def _runs_in_flight(backend: SqlBackend, store: TenantStore) -> int:
    """Runs of the tenant that a process may still write to the old placement.

    Those are ``running`` runs and ``queued`` ones that are not waiting, unclaimed, in the
    durable run queue (an asynchronous run executed in the API process is ``queued`` with
    a store already bound to the old placement). An unclaimed queue entry is safe: the
    queue does not hand out runs of a moving tenant, and the worker that later claims it
    resolves the placement from the tenant row, by then the new one.
    """
    pending = store.bulk().run_ids(_UNFINISHED)
    if not pending:
        return 0
    pending -= backend.unclaimed_runs(store.tenant_id)
    return len(pending)


def _wait_for_runs(backend: SqlBackend, store: TenantStore, timeout_s: float) -> None:
    """Wait until no run of the tenant is in flight in another process (see :func:`_runs_in_flight`).

    Raises:
        TenantMoveFailed: some still are after ``timeout_s`` seconds (``reason="runs_in_flight"``).
    """
    deadline = time.monotonic() + timeout_s
    while n := _runs_in_flight(backend, store):
        if time.monotonic() >= deadline:
            raise TenantMoveFailed(
                f"{n} run(s) of the tenant are still in flight after {timeout_s:g} s; try again later",
                tenant_id=store.tenant_id,
                reason="runs_in_flight",
                runs=n,
            )
        time.sleep(0.1)


def _copy_tables(
    backend: SqlBackend, tenant_id: str, src: StorageModel, dst: StorageModel, progress: Progress | None
) -> dict[str, int]:
    """Copy every data row of the tenant from ``src`` to ``dst`` as stored (ciphertext as is;
    audit records get new sequence numbers in the new placement, in the same order)."""
    old = _store_at(backend, tenant_id, src).bulk()
    new = _store_at(backend, tenant_id, dst).bulk()
    tables = _data_tables(backend, tenant_id, src)
    total = sum(old.count(t) for t in tables)
    done = 0
    rows: dict[str, int] = {}
    for table in tables:
        rows[table] = 0
        for page in old.pages(table):
            new.insert(table, page)
            rows[table] += len(page)
            done += len(page)
            if progress is not None:
                progress(done, max(total, done))
    return rows


def _verify_copy(backend: SqlBackend, tenant_id: str, src: StorageModel, dst: StorageModel) -> int:
    """Check the new placement holds exactly the old rows and that its payloads decrypt.

    Returns:
        How many payloads were decrypted from the new placement.

    Raises:
        TenantMoveFailed: counts or contents differ (``reason="verification_failed"``).
        DecryptionFailed: a copied payload does not decrypt.
    """
    old, new = _store_at(backend, tenant_id, src), _store_at(backend, tenant_id, dst)
    old_rows, new_rows = old.bulk(), new.bulk()
    for name in _data_tables(backend, tenant_id, src):
        before, after = old_rows.fingerprint(name), new_rows.fingerprint(name)
        if before != after:
            raise TenantMoveFailed(
                f"the copy of {name!r} differs from the original ({before[0]} rows before, "
                f"{after[0]} after); a write reached the old placement during the move",
                tenant_id=tenant_id,
                reason="verification_failed",
                table=name,
                rows_before=before[0],
                rows_after=after[0],
            )
    samples = 0
    for run in new.list_runs(limit=5):  # decrypts input and output
        samples += 1 + (run["output"] is not None)
    for key in new.memory_list(limit=5):
        new.memory_get(key)
        samples += 1
    return samples


def _shred_stale(backend: SqlBackend, tenant_id: str, current: StorageModel) -> tuple[StorageModel, ...]:
    """Remove the tenant's copies in every other storage model this deployment offers."""
    removed = []
    for model in sorted(backend.placements.supported() - {current}):
        _remove_copy(backend, tenant_id, model)
        removed.append(model)
    return tuple(removed)


def _movable(backend: SqlBackend, tenant_id: str, to: StorageModel) -> tuple[StorageModel, str | None]:
    """The tenant's storage model and its ``moving_to``, once a move to ``to`` may start.

    Raises:
        InvalidRequest: ``to`` is not offered here.
        TenantNotFound: no such tenant.
        InvalidTransition: the tenant is being deleted, or is moving to another model.
    """
    backend.placements.require(to)
    row = backend.get_tenant(tenant_id)
    if row["state"] not in _LIVE:
        raise InvalidTransition(
            f"cannot move a tenant that is {row['state']}",
            tenant_id=tenant_id,
            state=row["state"],
            action="move",
        )
    moving = row["moving_to"]
    if moving is not None and moving != to.value:
        raise InvalidTransition(
            f"the tenant is already moving to {moving}; abort that move first (abort_move)",
            tenant_id=tenant_id,
            moving_to=moving,
            action="move",
        )
    return StorageModel(row["storage_model"]), moving


def _copy_and_switch(
    backend: SqlBackend,
    tenant_id: str,
    src: StorageModel,
    to: StorageModel,
    *,
    progress: Progress | None,
    drain_timeout_s: float,
    grace_s: float,
) -> tuple[dict[str, int], int]:
    """The steps of a claimed move up to its switch: drain, provision, copy, verify, switch.

    Returns:
        ``(rows copied per table, payloads verified)``.

    Raises:
        TenantMoveFailed: runs still in flight, a copy that differs, or the tenant changed
            under the move.
    """
    old = _store_at(backend, tenant_id, src)
    time.sleep(grace_s)
    _wait_for_runs(backend, old, drain_timeout_s)
    _remove_copy(backend, tenant_id, to)  # leftovers of an interrupted attempt
    backend.placements.provision(tenant_id, to)
    rows = _copy_tables(backend, tenant_id, src, to, progress)
    samples = _verify_copy(backend, tenant_id, src, to)
    switch = {"state": _LIVE, "storage_model": src.value, "moving_to": to.value}
    if not backend.compare_and_set_tenant(tenant_id, switch, {"storage_model": to.value, "moving_to": None}):
        raise TenantMoveFailed(
            "the tenant changed during the move (deleted, or its move aborted)",
            tenant_id=tenant_id,
            reason="state_changed",
        )
    return rows, samples


def _finish_switched(
    backend: SqlBackend, tenant_id: str, model: StorageModel, moving: str | None, started: float
) -> MoveSummary:
    """Nothing to copy (the tenant is on ``model`` already): finish a move interrupted after
    its switch, lifting its hold and removing the stale copies elsewhere."""
    if moving is not None:
        backend.compare_and_set_tenant(tenant_id, {"moving_to": moving}, {"moving_to": None})
    shredded = _shred_stale(backend, tenant_id, model)
    return MoveSummary(
        tenant_id=tenant_id,
        from_model=model,
        to_model=model,
        shredded=shredded,
        resumed=True,
        duration_s=time.monotonic() - started,
    )


def move_tenant(
    backend: SqlBackend,
    tenant_id: str,
    to: StorageModel,
    *,
    actor: str,
    progress: Progress | None = None,
    drain_timeout_s: float = 30.0,
    grace_s: float = 0.2,
) -> MoveSummary:
    """Move a tenant to another storage model of this deployment while it keeps serving reads.

    Steps: mark the tenant ``moving_to=<to>`` (compare-and-set; the API then holds its
    writes with 503 ``tenant_moving`` and serves reads from the old placement); wait
    ``grace_s`` for writes already admitted, and for the tenant's runs in flight to finish
    (running ones, and queued ones not waiting unclaimed in the durable run queue: their
    stores are bound to the old placement); provision the new placement
    (after clearing any leftover of an interrupted attempt); copy every row of the tenant's
    data tables (agents, runs, memory, usage, audit; the old placement's catalog is read
    too, and rows in a table this build does not know stop the move) as stored, ciphertext
    as is (tenant id, table and record ids do not change, so the AAD still matches); verify that row counts
    and contents match table by table and that a sample of payloads decrypts from the new
    placement; switch ``storage_model=<to>, moving_to=NULL`` in one compare-and-set update;
    record ``tenant.move`` in the tenant's audit (``from``, ``to``, ``rows``); wait
    ``grace_s`` for reads that resolved the old placement just before the switch; then
    shred the old copy (pool: delete the tenant's rows; bridge/silo: drop the schema /
    database / file). Requests resolve the placement from the tenant row, so requests
    after the switch use the new one.

    Abort and resume: any failure before the switch drops the new placement (or the
    copied pool rows), clears ``moving_to``, records a failed ``tenant.move`` and re-raises;
    the tenant stays where it was. After a crash of the process mid-move, call again with
    the same ``to`` (it resumes: ``moving_to`` is already that model) or call
    :func:`abort_move`. After a crash between the switch and the shredding, call again
    with ``to`` = the tenant's (new) model: it removes the stale copies and returns
    ``resumed=True``. Do not run two moves of one tenant at once; the compare-and-set
    refuses a second one only while the first is between its claim and its switch.

    Between deployments (e.g. SQLite -> PostgreSQL) use :func:`export_tenant` on the
    source and :func:`import_tenant` on the target instead.

    Args:
        backend: the deployment's control-plane store.
        tenant_id: the tenant to move (active or suspended).
        to: the storage model to move it to; must be offered by this deployment.
        actor: who moves it, for the audit record.
        progress: called as ``progress(rows_copied, rows_total)``.
        drain_timeout_s: how long to wait for in-flight runs, seconds.
        grace_s: the wait for requests admitted before the hold / before the switch, seconds.

    Returns:
        What was moved.

    Raises:
        InvalidRequest: ``to`` is not offered here.
        TenantNotFound: no such tenant.
        InvalidTransition: the tenant is being deleted, or is moving to another model.
        TenantMoveFailed: runs still in flight, a write reached the old placement during
            the copy, or the tenant changed under the move (nothing switched).
        OperationFailed: a table this build does not know holds rows of the tenant
            (``reason="unknown_table"``; nothing switched).
        DecryptionFailed: a copied payload does not decrypt (nothing switched).
        StorageError: the database failed (nothing switched, if before the switch).
    """
    started = time.monotonic()
    to = StorageModel(to)
    src, moving = _movable(backend, tenant_id, to)
    if src is to:
        return _finish_switched(backend, tenant_id, src, moving, started)
    claim = {"state": _LIVE, "storage_model": src.value, "moving_to": moving}
    if not backend.compare_and_set_tenant(tenant_id, claim, {"moving_to": to.value}):
        raise InvalidTransition("the tenant changed while the move started; try again", tenant_id=tenant_id)
    try:
        rows, samples = _copy_and_switch(
            backend,
            tenant_id,
            src,
            to,
            progress=progress,
            drain_timeout_s=drain_timeout_s,
            grace_s=grace_s,
        )
    except BaseException as err:
        _abort(backend, tenant_id, src, to, actor, err)
        raise
    detail = {"from": src.value, "to": to.value, "rows": rows, "resumed": moving is not None}
    backend.acting_on(tenant_id).append_audit(
        actor=actor, action="tenant.move", target=tenant_id, outcome="ok", detail=detail
    )
    time.sleep(grace_s)
    _remove_copy(backend, tenant_id, src)
    return MoveSummary(
        tenant_id=tenant_id,
        from_model=src,
        to_model=to,
        rows=rows,
        verified_samples=samples,
        shredded=(src,),
        resumed=moving is not None,
        duration_s=time.monotonic() - started,
    )


def _abort(
    backend: SqlBackend, tenant_id: str, src: StorageModel, to: StorageModel, actor: str, err: BaseException
) -> None:
    """Undo a move that did not switch: drop the new copy, lift the hold, audit. Never masks ``err``."""
    steps: list[tuple[str, Callable[[], object]]] = [
        ("dropping the new copy", lambda: _remove_copy(backend, tenant_id, to)),
        (
            "clearing moving_to",
            lambda: backend.compare_and_set_tenant(
                tenant_id, {"storage_model": src.value, "moving_to": to.value}, {"moving_to": None}
            ),
        ),
        (
            "recording the failed move",
            lambda: _store_at(backend, tenant_id, src).append_audit(
                actor=actor,
                action="tenant.move",
                target=tenant_id,
                outcome="failed",
                detail={
                    "from": src.value,
                    "to": to.value,
                    "error": err.code if isinstance(err, PatinoxError) else type(err).__name__,
                },
            ),
        ),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as cleanup:
            err.add_note(f"aborting the move of {tenant_id}: {what} failed too: {cleanup!r}")


def abort_move(backend: SqlBackend, tenant_id: str, *, actor: str) -> bool:
    """Abandon a move left unfinished by a crashed process: drop its partial copy, lift the hold.

    Only for a move whose process is gone (a running move aborts itself on failure).

    Returns:
        True if a move was aborted; False if the tenant was not moving.

    Raises:
        TenantNotFound: no such tenant.
        StorageError: the database failed.
    """
    row = backend.get_tenant(tenant_id, include_deleted=True)
    if row["moving_to"] is None:
        return False
    src, to = StorageModel(row["storage_model"]), StorageModel(row["moving_to"])
    if to is not src:
        _remove_copy(backend, tenant_id, to)
    backend.compare_and_set_tenant(tenant_id, {"moving_to": to.value}, {"moving_to": None})
    with contextlib.suppress(Exception):
        _store_at(backend, tenant_id, src).append_audit(
            actor=actor,
            action="tenant.move",
            target=tenant_id,
            outcome="aborted",
            detail={"from": src.value, "to": to.value},
        )
    return True
