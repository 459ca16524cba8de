"""Bulk access to one tenant's rows, table by table: what export, import and moves need.

A tenant's data leaves and enters a placement here, never through SQL of the caller's
own: :class:`BulkRows` is bound to one tenant and one placement when made (by
:meth:`TenantStore.bulk`), adds the ``tenant_id`` predicate to every read, delete and
count, and writes every inserted row under its own tenant id. Payload sealing stays in
storage as well: a caller asks for rows opened (plaintext payloads) or as stored
(ciphertext, for a copy between placements of the same tenant), and inserts plaintext to
be sealed or stored values to be kept; it never holds the tenant's sealer.

Two control-plane helpers for moves live here too (a compare-and-set of the tenant row,
and the tenant's runs waiting unclaimed in the durable run queue); :class:`SqlBackend`
exposes them.

Tables are named by their table name (``"runs"``); a name this build's schema does not
know is read from the placement's catalog (only :meth:`BulkRows.count` accepts one).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, MetaData, Table, Text, delete, func, insert, literal, select, update

from patinox.storage import _schema as s
from patinox.storage._sealer import Sealer, sealed_columns
from patinox.storage.engine import translate_errors
from patinox.storage.records import AnyRow

if TYPE_CHECKING:
    from patinox.storage._placement import Placement

#: A transaction bound to the tenant (``TenantStore._tx`` or ``SqlBackend.control_tx``).
Transaction = Callable[[], AbstractContextManager[Connection]]

#: Rows per page read, and per statement written.
PAGE_ROWS = 500
#: Column each table's pages are walked by (a keyset: unique within the tenant, so the
#: order is stable and a page never repeats or skips a row); audit in sequence order.
_WALK_KEY = {
    "agents": "id",
    "runs": "id",
    "run_attempts": "id",
    "memory": "key",
    "usage_records": "id",
    "audit_log": "seq",
    "idempotency_keys": "key",
    "threads": "id",
    "thread_messages": "id",
    "webhook_endpoints": "id",
    "secrets": "name",
}
#: The placement's own numbering of rows, never carried from one placement to another.
_PLACEMENT_COLUMNS = ("seq",)

#: An attempt with its run's agent (every attempt has its run: the key cascades).
_ATTEMPTS_WITH_RUN_AGENT = select(s.run_attempts, s.runs.c.agent_id.label("run_agent_id")).join(
    s.runs, (s.runs.c.tenant_id == s.run_attempts.c.tenant_id) & (s.runs.c.id == s.run_attempts.c.run_id)
)


class BulkRows:
    """One tenant's rows in one placement, read and written a table at a time.

    Made by :meth:`TenantStore.bulk`; bound to the store's tenant and placement. Every
    read, count and delete is scoped to that tenant; every insert writes that tenant's
    id whatever the rows say.
    """

    __slots__ = ("_placement", "_sealer", "_tx", "tenant_id")

    def __init__(
        self,
        placement: Placement,
        tx: Transaction,
        sealer: Sealer,
        *,
        tenant_id: str,
    ) -> None:
        self._placement = placement
        self._tx = tx
        self._sealer = sealer
        self.tenant_id = tenant_id

    def _table(self, name: str) -> Table:
        return s.metadata.tables[name]

    def count(self, table: str) -> int:
        """Rows of the tenant in ``table``.

        A table this build's schema does not know is read from the placement's catalog
        (so a caller can check that a table it cannot carry holds nothing of the tenant).

        Raises:
            StorageError: the database failed, or the placement has no such table.
        """
        known = s.metadata.tables.get(table)
        if known is None:
            p = self._placement
            with translate_errors():
                reflected = Table(table, MetaData(), schema=p.schema, autoload_with=p.engine)
            # schema=None (typed as str only) makes a schema-less copy; the transaction's
            # schema translation then addresses the placement's schema.
            known = reflected.to_metadata(MetaData(), schema=None)  # type: ignore[arg-type]
        q = select(func.count()).select_from(known).where(known.c.tenant_id == self.tenant_id)
        with self._tx() as conn:
            return int(conn.execute(q).scalar_one())

    def pages(
        self,
        table: str,
        *,
        opened: bool = False,
        order_by: str | None = None,
        with_run_agent: bool = False,
    ) -> Iterator[list[AnyRow]]:
        """The tenant's rows of ``table`` in pages of :data:`PAGE_ROWS` rows, each page read
        in a transaction of its own, in a stable order.

        Args:
            table: a table of the tenant's data (``agents``, ``runs``, ``run_attempts``,
                ``memory``, ``usage_records``, ``audit_log``).
            opened: payloads decrypted (plaintext ``str``); otherwise as stored (sealed
                ``bytes``, for a copy into another placement of the same tenant: the AAD
                names tenant, table and record, none of which changes).
            order_by: the unique column to walk in ascending order; default the table's
                key (``key`` for memory, ``seq`` for audit, else ``id``).
            with_run_agent: ``run_attempts`` only: add ``run_agent_id``, the agent of
                each attempt's run.

        Yields:
            Lists of rows (column name -> value, ``tenant_id`` included); a table with
            no row of the tenant yields nothing. Rows written while the walk is under
            way are read if their key sorts after the last page read.

        Raises:
            DecryptionFailed: ``opened`` and a stored payload fails authentication.
            StorageError: the database failed.
        """
        t = self._table(table)
        key = t.c[order_by or _WALK_KEY[table]]
        chosen: Any = _ATTEMPTS_WITH_RUN_AGENT if with_run_agent else select(t)
        base = chosen.where(t.c.tenant_id == self.tenant_id).order_by(key).limit(PAGE_ROWS)
        sealed = opened and bool(sealed_columns(table))
        last: Any = None
        while True:
            q = base if last is None else base.where(key > last)
            with self._tx() as conn:
                rows = [dict(r) for r in conn.execute(q).mappings()]
            if not rows:
                return
            last = rows[-1][key.name]
            for row in rows if sealed else ():
                self._sealer.open_row(table, row)
            yield rows
            if len(rows) < PAGE_ROWS:
                return

    def insert(self, table: str, rows: Sequence[Mapping[str, Any]], *, seal: bool = False) -> int:
        """Insert ``rows`` into ``table`` as the tenant's, in one transaction.

        Every row is written with this tenant's id, whatever its ``tenant_id`` says, and
        without the placement's own numbering (``seq``: the new rows are numbered in the
        order given).

        Args:
            table: a table of the tenant's data.
            rows: column name -> value; at most a few thousand (one statement).
            seal: the payload columns hold plaintext, to be sealed with the tenant's
                current DEK (sealing happens before the transaction opens, since it may
                create the DEK); otherwise they are stored as given.

        Returns:
            Rows inserted.

        Raises:
            AlreadyExists: a row's key is taken.
            StorageError: the database failed.
        """
        if not rows:
            return 0
        out = [self._row_to_insert(table, row, seal) for row in rows]
        with self._tx() as conn:
            conn.execute(insert(self._table(table)), out)
        return len(out)

    def _row_to_insert(self, table: str, row: Mapping[str, Any], seal: bool) -> AnyRow:
        out = {k: v for k, v in row.items() if k not in _PLACEMENT_COLUMNS}
        out["tenant_id"] = self.tenant_id
        return self._sealer.seal_row(table, out) if seal else out

    def delete_all(self, tables: Sequence[str]) -> dict[str, int]:
        """Delete every row of the tenant from ``tables``, in the order given (children
        first), in one transaction.

        Returns:
            Rows deleted per table.

        Raises:
            StorageError: the database failed (nothing is deleted).
        """
        counts: dict[str, int] = {}
        with self._tx() as conn:
            for name in tables:
                t = self._table(name)
                counts[name] = int(conn.execute(delete(t).where(t.c.tenant_id == self.tenant_id)).rowcount)
        return counts

    def fingerprint(self, table: str) -> tuple[int, str]:
        """``(rows, hex SHA-256 of the rows)`` of the tenant in ``table``, as stored.

        Equal for two placements holding the same rows: the placement's own numbering
        (``seq``) is left out and audit records are walked by id instead.

        Raises:
            StorageError: the database failed.
        """
        digest = hashlib.sha256()
        n = 0
        order_by = "id" if table == "audit_log" else None
        for page in self.pages(table, order_by=order_by):
            for row in page:
                for column in _PLACEMENT_COLUMNS:
                    row.pop(column, None)
                digest.update(_canonical(row))
                n += 1
        return n, digest.hexdigest()

    def run_ids(self, statuses: Collection[str]) -> set[str]:
        """Ids of the tenant's runs in one of ``statuses``.

        Raises:
            StorageError: the database failed.
        """
        r = s.runs
        q = select(r.c.id).where(r.c.tenant_id == self.tenant_id, r.c.status.in_(list(statuses)))
        with self._tx() as conn:
            return {str(x) for x in conn.execute(q).scalars()}

    def reseal(self, *, progress: Callable[[int, int], None] | None = None, batch: int = 200) -> int:
        """Re-seal every payload of the tenant that is not under its current DEK version
        (the background job after a DEK rotation). Each row is updated only if it still
        holds the value read (compare-and-set), so concurrent writes are never lost.

        Args:
            progress: called with (rows done, rows in all) as it goes.
            batch: rows read per query.

        Returns:
            Rows re-sealed.

        Raises:
            DecryptionFailed: a stored payload fails authentication.
            StorageError: the database failed.
        """
        current = self._sealer.keyring.current_key(self.tenant_id).version
        todo: list[tuple[Table, str, str, str, Any, bytes | str]] = []
        for table_name, key_col, col, aad in sealed_columns():
            table = self._table(table_name)
            sealed = select(table.c[key_col], table.c[col]).where(
                table.c.tenant_id == self.tenant_id, table.c[col].is_not(None)
            )
            with self._tx() as conn:
                rows = conn.execute(sealed).all()
            todo += [(table, key_col, col, aad, k, v) for k, v in rows if self._sealer.version(v) < current]
        done = 0
        for start in range(0, len(todo), batch):
            with self._tx() as conn:
                for table, key_col, col, aad, key, old in todo[start : start + batch]:
                    fresh = self._sealer.seal(aad, str(key), self._sealer.open(aad, str(key), old) or "")
                    # Compared as read: a legacy value SQLite kept as text is not bytes.
                    held = literal(old, Text()) if isinstance(old, str) else old
                    row = (table.c.tenant_id == self.tenant_id, table.c[key_col] == key)
                    conn.execute(update(table).where(*row, table.c[col] == held).values({col: fresh}))
                    done += 1
            if progress is not None:
                progress(done, len(todo))
        return done


def _canonical(row: Mapping[str, Any]) -> bytes:
    """One JSON line of ``row``, keys sorted; datetimes ISO 8601, bytes base64."""
    text = json.dumps(row, default=_json_default, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return text.encode("utf-8") + b"\n"


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


# -- control plane -----------------------------------------------------------------------


def compare_and_set_tenant(
    tx: Transaction, tenant_id: str, expect: Mapping[str, Any], values: Mapping[str, Any]
) -> bool:
    """One UPDATE of the tenant row, only if every column in ``expect`` still holds its
    value (``None``: IS NULL; a tuple: any of these). Returns whether it was updated."""
    t = s.tenants
    q = update(t).where(t.c.id == tenant_id)
    for column, value in expect.items():
        if value is None:
            q = q.where(t.c[column].is_(None))
        elif isinstance(value, tuple):
            q = q.where(t.c[column].in_(value))
        else:
            q = q.where(t.c[column] == value)
    with tx() as conn:
        return int(conn.execute(q.values(**values, updated_at=datetime.now(UTC))).rowcount) == 1


def unclaimed_runs(tx: Transaction, tenant_id: str) -> set[str]:
    """Ids of the tenant's runs waiting, unclaimed, in the durable run queue."""
    q = s.run_queue
    waiting = select(q.c.run_id).where(q.c.tenant_id == tenant_id, q.c.claimed_by.is_(None))
    with tx() as conn:
        return {str(r) for r in conn.execute(waiting).scalars()}
