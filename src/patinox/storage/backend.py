"""The tenancy data layer: a control-plane store and tenant-scoped stores over SQL.

Two kinds of access, kept apart:

* :class:`SqlBackend` — the control plane, used by operator code (tenant manager, key
  verification, operator audit and usage views). Its methods take explicit tenant ids
  because operators act *on* tenants.
* :class:`TenantStore` — everything a tenant owns. It is bound to exactly one tenant when
  made (from the active :class:`~patinox.tenancy.TenantContext`, or one passed in
  explicitly as data) and adds the ``tenant_id`` predicate to every statement itself;
  its callers never pass a tenant id and cannot name another tenant's rows.

All datetimes are timezone-aware UTC. Driver errors surface as
:class:`~patinox.errors.StorageError` with the original chained.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import (
    Connection,
    Engine,
    LargeBinary,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.sql.elements import BindParameter

from patinox.errors import (
    AlreadyExists,
    ConfigurationError,
    DecryptionFailed,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    StorageError,
    TenantNotFound,
)
from patinox.storage import _bulk
from patinox.storage import _schema as s
from patinox.storage._cache import MISS, TenantCache, epoch_for_url
from patinox.storage._crypto.aead import blob_key_version, decrypt_str, encrypt_str
from patinox.storage._crypto.keyring import TenantKeyring
from patinox.storage._crypto.providers import KeyProvider
from patinox.storage._dekstore import SqlDekStore
from patinox.storage._fast import write as fast_write
from patinox.storage._placement import Placement, Placements
from patinox.storage.engine import (
    begin,
    dispose,
    head_revision,
    make_engine,
    migrate,
    normalise_url,
    translate_errors,
)
from patinox.tenancy import StorageModel, TenantContext, current_tenant, new_id

_SET_CONTROL = text("SELECT set_config('patinox.scope', 'control', true)")
_SET_TENANT = text("SELECT set_config('patinox.tenant_id', :tenant_id, true)")

Row = dict[str, Any]

# Statements of the run path, built once. Building a Core statement costs about 150 us and
# executing a prebuilt one about 20 us (bench: a sync run issues a dozen), so the hot path
# reuses these and passes values as parameters. Tenant-store statements take the tenant as
# the parameter ``b_tenant_id``, which only TenantStore._bound supplies (from its binding).
_B_TENANT: BindParameter[str] = bindparam("b_tenant_id")
_GET_AGENT = select(s.agents).where(s.agents.c.tenant_id == _B_TENANT, s.agents.c.id == bindparam("b_id"))
_GET_RUN = select(s.runs).where(s.runs.c.tenant_id == _B_TENANT, s.runs.c.id == bindparam("b_id"))
#: Executed with the columns to set as parameters (SET follows the parameter names).
_UPDATE_RUN = update(s.runs).where(s.runs.c.tenant_id == _B_TENANT, s.runs.c.id == bindparam("b_id"))
_INSERT_RUN = insert(s.runs)
_INSERT_USAGE = insert(s.usage_records)
_INSERT_AUDIT = insert(s.audit_log)
_A = s.run_attempts
#: Ends attempt ``b_attempt`` of run ``b_run`` with the values given (outcome, ended_at,
#: tokens), unless it already ended; an attempt the reaper marked ``interrupted`` (its
#: lease expired) is ended by its own worker too, which had only stalled and knows how it
#: really ended.
_END_ATTEMPT = update(_A).where(
    _A.c.tenant_id == _B_TENANT,
    _A.c.run_id == bindparam("b_run"),
    _A.c.attempt == bindparam("b_attempt"),
    or_(_A.c.outcome.is_(None), _A.c.outcome == "interrupted"),
)


def _usage_upsert(make: Any) -> Any:
    """The usage record of one attempt of a run, replacing the record of that attempt if
    there is one (the reaper's record of an attempt whose worker turned out to be alive
    is superseded by the worker's own, which counts everything the attempt used)."""
    u = s.usage_records
    stmt = make(u)
    columns = ("at", "model", "simulated", "input_tokens", "output_tokens", "tool_calls", "duration_ms")
    return stmt.on_conflict_do_update(
        index_elements=[u.c.tenant_id, u.c.run_id, u.c.attempt],
        set_={c: stmt.excluded[c] for c in columns},
    )


#: Per dialect (a placement's engine is PostgreSQL or SQLite).
_UPSERT_ATTEMPT_USAGE = {True: _usage_upsert(pg_insert), False: _usage_upsert(sqlite_insert)}
_FIND_KEY = (
    select(
        s.api_keys,
        s.tenants.c.state.label("t_state"),
        s.tenants.c.plan.label("t_plan"),
        s.tenants.c.limit_overrides.label("t_limit_overrides"),
        s.tenants.c.isolation_level.label("t_isolation_level"),
        s.tenants.c.storage_model.label("t_storage_model"),
        s.tenants.c.moving_to.label("t_moving_to"),
    )
    .select_from(s.api_keys.outerjoin(s.tenants, s.tenants.c.id == s.api_keys.c.tenant_id))
    .where(s.api_keys.c.prefix == bindparam("b_prefix"))
)
#: Columns naming a tenant row's owner and identity: never in the SET of a store update.
_ROW_KEY_COLUMNS = frozenset({"tenant_id", "id"})


#: PostgreSQL: the per-tenant lock agent creations take turns on (transaction-scoped).
_LOCK_TENANT_AGENTS = text("SELECT pg_advisory_xact_lock(hashtext('patinox.agents:' || :t))")


def _memory_bytes(conn: Connection) -> Any:
    """The statement summing a tenant's stored agent memory, bytes: each entry's sealed
    value plus its key's UTF-8 bytes (keys are stored in clear and count too)."""
    m = s.memory
    key_bytes = (
        func.octet_length(m.c.key)
        if conn.dialect.name == "postgresql"
        else func.length(cast(m.c.key, LargeBinary))
    )
    total = func.coalesce(func.sum(func.length(m.c.value) + key_bytes), 0)
    return select(total).where(m.c.tenant_id == _B_TENANT)


_TENANT_COLUMNS = ("state", "plan", "limit_overrides", "isolation_level", "storage_model", "moving_to")


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


def _row(mapping: Mapping[str, Any] | None) -> Row | None:
    return dict(mapping) if mapping is not None else None


#: Seconds the purge retries a WAL truncation that another checkpoint made busy.
_TRUNCATE_WAIT_S = 5.0
#: The cache of a store made without one: disabled, so it holds nothing and is shared.
_NO_CACHE = TenantCache(None)


def _copy_row(row: Row) -> Row:
    """A copy of a cached row whose lists and dicts (JSON columns) are copies too."""
    return {k: v.copy() if isinstance(v, list | dict) else v for k, v in row.items()}


class StorageBackend(Protocol):
    """What the rest of Patinox needs from a storage backend (one per database URL)."""

    def migrate(self) -> None: ...
    def tenant_store(self, ctx: TenantContext | None = None) -> TenantStore: ...
    def close(self) -> None: ...


def open_backend(
    url: str,
    *,
    key_provider: KeyProvider,
    owner_url: str | None = None,
    app_role: str | None = None,
    migrate_schema: bool = True,
) -> SqlBackend:
    """Open the backend for a database URL (see :mod:`patinox.storage.engine` for formats).

    Args:
        url: the application URL (on PostgreSQL: the application role).
        key_provider: holds the KEK that wraps every tenant's DEK
            (:func:`patinox.storage.crypto.key_provider_from_url`).
        owner_url: PostgreSQL owner-role URL for migrations and tenant schemas/databases;
            defaults to ``url`` (right for SQLite; on PostgreSQL the app role then needs DDL
            rights, which a production deployment should not give it).
        app_role: PostgreSQL application role to grant access to what the owner creates;
            defaults to the user name in ``url`` when ``owner_url`` differs.
        migrate_schema: apply pending migrations now.

    Raises:
        ConfigurationError: unsupported URL.
        StorageError: the database cannot be opened or migrated.
    """
    engine = make_engine(url)
    owner = make_engine(owner_url, pool_size=2) if owner_url and owner_url != url else engine
    if app_role is None and owner is not engine:
        app_role = make_url(normalise_url(url)).username
    backend = SqlBackend(
        engine,
        key_provider=key_provider,
        placements=Placements(
            app_url=url, owner_url=owner_url or url, app_role=app_role, main=engine, owner=owner
        ),
    )
    if migrate_schema:
        backend.migrate()
    return backend


class SqlBackend:
    """Control-plane access plus a factory of tenant-bound stores.

    On PostgreSQL every control-plane transaction declares itself with the
    transaction-local setting ``patinox.scope = 'control'`` (the row-level security
    policies let such transactions see every tenant's rows, for key lookup, deletion and
    operator views); tenant stores set ``patinox.tenant_id`` instead.
    """

    def __init__(
        self, engine: Engine, *, key_provider: KeyProvider, placements: Placements | None = None
    ) -> None:
        self.engine = engine
        #: Per-tenant DEKs (wrapped in ``tenant_keys``), cached per tenant and version.
        self.keyring = TenantKeyring(SqlDekStore(self), key_provider)
        self.placements = placements or Placements(
            app_url=engine.url.render_as_string(hide_password=False),
            owner_url=engine.url.render_as_string(hide_password=False),
            app_role=None,
            main=engine,
            owner=engine,
        )
        self._postgres = engine.dialect.name == "postgresql"
        #: Key and agent lookups, per tenant, emptied by any process's change (see
        #: :mod:`patinox.storage._cache`; off on PostgreSQL).
        self.cache = TenantCache(epoch_for_url(engine.url.render_as_string(hide_password=False)))

    # -- plumbing -------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with translate_errors(), begin(self.engine) as conn:
            if self._postgres:
                conn.execute(_SET_CONTROL)
            yield conn

    def control_tx(self, conn: Connection | None = None) -> AbstractContextManager[Connection]:
        """A control-plane transaction, or ``conn`` when the caller already holds one (so
        several control-plane steps commit or roll back together).

        Joining is :func:`contextlib.nullcontext`, not a generator: every quota, queue and
        settlement step of a run joins its caller's transaction this way, about eight times
        a run; committing or rolling back stays with the caller.
        """
        if conn is not None:
            return nullcontext(conn)
        return self._tx()

    def migrate(self) -> None:
        """Apply pending Alembic migrations (as the owner role), then grant the app role;
        then bring every live bridge schema and silo database up to the same revision (a
        placement's tables are those of the main database, so a migration that changes a
        tenant table must reach them too)."""
        with translate_errors():
            migrate(self.placements.owner, app_role=self.placements.app_role)
        head = head_revision()
        for tenant in self.list_tenants():
            model = StorageModel(tenant["storage_model"])
            if tenant["state"] in ("active", "suspended"):
                self.placements.upgrade(tenant["id"], model, head)

    def ping(self) -> None:
        """Run ``SELECT 1`` on the deployment's main database through the application's
        connection pool, for a readiness probe. Blocking (callers on an event loop run it in
        a thread); a database that does not answer can block it as long as the driver waits.

        Raises:
            StorageError: the database refused or failed; the driver error is chained.
        """
        with translate_errors(), self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def close(self) -> None:
        """Release every pooled connection and the cache's epoch file."""
        self.cache.close()
        self.placements.close()
        if self.placements.owner is not self.engine:
            dispose(self.placements.owner)
        dispose(self.engine)

    def tenant_store(self, ctx: TenantContext | None = None) -> TenantStore:
        """A store bound to ``ctx``'s tenant, or to the active tenant context.

        Raises:
            TenantContextMissing: no ``ctx`` and no active tenant scope (fail closed).
        """
        ctx = ctx or current_tenant()
        placement = self.placements.for_tenant(ctx.tenant_id, ctx.storage_model)
        return TenantStore(
            placement,
            _Sealer(self.keyring, ctx.tenant_id),
            memory_bytes_limit=ctx.limits.memory_bytes,
            agents_limit=ctx.limits.max_agents,
            cache=self.cache,
        )

    def acting_on(self, tenant_id: str) -> TenantStore:
        """A store bound to ``tenant_id`` for control-plane code acting *on* a tenant
        (lifecycle audit, key audit, usage loading). Tenant-facing code uses :meth:`tenant_store`.

        Raises:
            TenantNotFound: no such tenant, or it was deleted (its rows, schema, database
                or file are gone and are never opened, let alone re-created).
        """
        return self._store_of(self.get_tenant(tenant_id))

    def _store_of(self, tenant: Row) -> TenantStore:
        tenant_id = tenant["id"]
        placement = self.placements.for_tenant(tenant_id, StorageModel(tenant["storage_model"]))
        return TenantStore(placement, _Sealer(self.keyring, tenant_id), cache=self.cache)

    def _records_of(self, tenant_id: str) -> TenantStore | None:
        """The store an operator view reads ``tenant_id``'s records from, or ``None`` while
        the tenant is being deleted (its records are being purged and its schema, database
        or file may be gone already: it has none to show).

        Raises:
            TenantNotFound: no such tenant, or it was deleted.
        """
        tenant = self.get_tenant(tenant_id)
        return None if tenant["state"] == "deleting" else self._store_of(tenant)

    # -- tenants --------------------------------------------------------------------

    def insert_tenant(self, values: Row) -> Row:
        """Insert a tenant row. Raises :class:`AlreadyExists` when the live name is taken."""
        try:
            with self._tx() as conn:
                conn.execute(insert(s.tenants).values(**values))
        except AlreadyExists as err:
            raise AlreadyExists(f"a tenant named {values['name']!r} already exists") from err
        return values

    def get_tenant(self, tenant_id: str, *, include_deleted: bool = False) -> Row:
        """The tenant row. Raises :class:`TenantNotFound` (also for deleted ones by default)."""
        with self._tx() as conn:
            row = conn.execute(select(s.tenants).where(s.tenants.c.id == tenant_id)).mappings().first()
        if row is None or (row["state"] == "deleted" and not include_deleted):
            raise TenantNotFound(f"tenant {tenant_id!r} not found", tenant_id=tenant_id)
        return dict(row)

    def list_tenants(self, *, include_deleted: bool = False) -> list[Row]:
        """All tenants, oldest first."""
        q = select(s.tenants).order_by(s.tenants.c.created_at, s.tenants.c.id)
        if not include_deleted:
            q = q.where(s.tenants.c.state != "deleted")
        with self._tx() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def update_tenant(self, tenant_id: str, values: Row, *, expect_state: str | None = None) -> Row:
        """Update a tenant row, optionally only if it is still in ``expect_state``.

        Raises:
            TenantNotFound: no such tenant, or its state changed under us.
        """
        q = update(s.tenants).where(s.tenants.c.id == tenant_id)
        if expect_state is not None:
            q = q.where(s.tenants.c.state == expect_state)
        with self._tx() as conn:
            if conn.execute(q.values(**values, updated_at=utcnow())).rowcount != 1:
                raise TenantNotFound(f"tenant {tenant_id!r} not found", tenant_id=tenant_id)
        self.cache.changed(tenant_id)
        return self.get_tenant(tenant_id, include_deleted=True)

    def tenant_owned_tables(self, engine: Engine | None = None, schema: str | None = None) -> list[str]:
        """Names of every table with a ``tenant_id`` column, read from the live catalog."""
        with translate_errors():
            insp = inspect(engine or self.engine)
            return sorted(
                name
                for name in insp.get_table_names(schema=schema)
                if name != "tenants"
                and any(col["name"] == "tenant_id" for col in insp.get_columns(name, schema=schema))
            )

    def purge_tenant(self, tenant_id: str, model: StorageModel = StorageModel.POOL) -> dict[str, int]:
        """Delete every row of ``tenant_id`` from every tenant-owned table of the shared
        database (one transaction), then drop its bridge schema or silo database/file (and
        any under another storage model, which a move may have left).

        Tables are found from the database catalog, so a table added later is covered
        without editing this code. Returns rows deleted per table (``"<placement>"`` counts
        a dropped schema/database as 1). Idempotent.
        """
        counts: dict[str, int] = {}
        tables = self.tenant_owned_tables()
        with self._tx() as conn:
            # Children before parents (runs reference agents).
            for name in sorted(tables, key=lambda n: n != "runs"):
                table = s.metadata.tables.get(name)
                if table is None:
                    table = Table(name, s.metadata.__class__(), autoload_with=conn)
                counts[name] = conn.execute(delete(table).where(table.c.tenant_id == tenant_id)).rowcount
        self.cache.changed(tenant_id)
        if model is not StorageModel.POOL:
            self.placements.destroy(tenant_id, model)
            counts[f"<{model.value}>"] = 1
        # A move between storage models racing the deletion may have switched the tenant
        # after ``model`` was read, or crashed holding its new copy: drop the tenant's own
        # storage under every other model too (destroy is idempotent).
        for other in sorted(self.placements.supported() - {model, StorageModel.POOL}):
            self.placements.destroy(tenant_id, other)
        if self.engine.dialect.name == "sqlite":
            # With secure_delete the freed pages are zeroed; truncating the WAL drops the
            # older page images that still held the rows.
            self.truncate_wal(tenant_id)
        return counts

    def truncate_wal(self, tenant_id: str) -> None:
        """SQLite: copy the WAL into the database and truncate it, so page images of the
        tenant's deleted rows are gone from the ``-wal`` file too.

        A checkpoint running at that moment (the background pass of
        :mod:`patinox.storage._checkpoint`, here or in another process) makes SQLite
        answer busy without an error, so this retries for up to 5 s.

        Raises:
            StorageError: still busy after 5 s (the deletion or move is resumable: retry it).
        """
        deadline = time.monotonic() + _TRUNCATE_WAIT_S
        with translate_errors(), self.engine.connect() as conn:
            while conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()[0]:
                if time.monotonic() >= deadline:
                    raise StorageError(
                        "the WAL could not be truncated after deleting a tenant's rows (busy); retry",
                        tenant_id=tenant_id,
                    )
                time.sleep(0.01)

    # -- api keys -------------------------------------------------------------------

    def insert_api_key(self, values: Row) -> Row:
        """Insert an API key row (hash only; the secret is never stored)."""
        with self._tx() as conn:
            conn.execute(insert(s.api_keys).values(**values))
        return values

    def find_api_key(self, prefix: str) -> tuple[Row, Row | None] | None:
        """The key row with ``prefix`` and its tenant row (``None`` for operator keys).

        Served from :attr:`cache` when nothing changed since it was read; the rows are
        copies the caller may change."""
        seen = self.cache.epoch()
        cached = self.cache.get(("key", prefix))
        if cached is MISS:
            with self._tx() as conn:
                row = conn.execute(_FIND_KEY, {"b_prefix": prefix}).mappings().first()
            if row is None:
                return None
            data = dict(row)
            joined = {name: data.pop(f"t_{name}") for name in _TENANT_COLUMNS}
            cached = (data, None if data["tenant_id"] is None else {"id": data["tenant_id"], **joined})
            self.cache.put(data["tenant_id"], ("key", prefix), cached, seen)
        data, tenant = cached
        return _copy_row(data), None if tenant is None else _copy_row(tenant)

    def key_may(self, key_id: str, tenant_id: str, scope: str) -> bool:
        """True when ``key_id`` is a live (unrevoked) key of ``tenant_id`` holding ``scope``."""
        k = s.api_keys
        with self._tx() as conn:
            row = conn.execute(
                select(k.c.scopes).where(
                    k.c.id == key_id, k.c.tenant_id == tenant_id, k.c.revoked_at.is_(None)
                )
            ).first()
        return row is not None and scope in row[0]

    def list_api_keys(self, tenant_id: str | None) -> list[Row]:
        """Keys of one tenant (or operator keys when ``tenant_id`` is None), no hashes."""
        cond = s.api_keys.c.tenant_id.is_(None) if tenant_id is None else s.api_keys.c.tenant_id == tenant_id
        q = select(s.api_keys).where(cond).order_by(s.api_keys.c.created_at)
        with self._tx() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        for r in rows:
            r.pop("secret_hash")
        return rows

    def revoke_api_key(self, key_id: str, tenant_id: str | None) -> Row:
        """Mark a key revoked. Raises :class:`NotFound` if it is not that tenant's key."""
        cond = s.api_keys.c.tenant_id.is_(None) if tenant_id is None else s.api_keys.c.tenant_id == tenant_id
        with self._tx() as conn:
            n = conn.execute(
                update(s.api_keys)
                .where(s.api_keys.c.id == key_id, cond, s.api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            ).rowcount
            row = conn.execute(select(s.api_keys).where(s.api_keys.c.id == key_id, cond)).mappings().first()
        if row is None:
            raise NotFound(f"api key {key_id!r} not found", key_id=key_id)
        if n:
            self.cache.changed(tenant_id)
        out = dict(row)
        out.pop("secret_hash")
        return out

    # -- operator views -------------------------------------------------------------

    def append_operator_audit(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        detail: Mapping[str, Any] | None = None,
    ) -> Row:
        """An operator-level audit record (tenant id NULL): kept after a tenant is deleted."""
        values = _audit_values(None, actor, action, target, outcome, detail)
        with self._tx() as conn:
            conn.execute(insert(s.audit_log).values(**values))
        return values

    def list_audit(
        self,
        tenant_id: str | None,
        *,
        limit: int = 100,
        after_seq: int = 0,
    ) -> list[Row]:
        """Audit records of one tenant (wherever it is stored), or, when ``tenant_id`` is
        None, of the shared database: operator records and every pool tenant's.

        A tenant being deleted has none (``[]``).

        Raises:
            TenantNotFound: no such tenant, or it was deleted (as for an id never issued).
        """
        if tenant_id is not None:
            store = self._records_of(tenant_id)
            return [] if store is None else store.list_audit(limit=limit, after_seq=after_seq)
        q = select(s.audit_log).where(s.audit_log.c.seq > after_seq)
        with self._tx() as conn:
            return [dict(r) for r in conn.execute(q.order_by(s.audit_log.c.seq).limit(limit)).mappings()]

    def _separate_tenants(self) -> list[Row]:
        """Active and suspended tenants stored outside the shared tables (bridge, silo); a
        tenant being deleted is left out (its storage may be gone already)."""
        return [
            t
            for t in self.list_tenants()
            if t["storage_model"] != StorageModel.POOL.value and t["state"] in ("active", "suspended")
        ]

    def usage_summary(self, tenant_id: str | None, *, since: datetime | None = None) -> list[Row]:
        """Usage totals per tenant and model since ``since`` (every tenant when ``tenant_id``
        is None). A tenant being deleted has none (``[]``).

        Raises:
            TenantNotFound: no such tenant, or it was deleted (as for an id never issued).
        """
        if tenant_id is not None:
            store = self._records_of(tenant_id)
            return [] if store is None else store.usage_summary(since=since)
        with self._tx() as conn:
            rows = [dict(r) for r in conn.execute(_usage_summary_query(None, since)).mappings()]
        for tenant in self._separate_tenants():
            rows += self._store_of(tenant).usage_summary(since=since)
        return rows

    # -- moves between storage models -----------------------------------------------

    def acting_on_model(self, tenant_id: str, model: StorageModel) -> TenantStore:
        """Like :meth:`acting_on`, but bound to the tenant's placement under ``model``,
        which need not be its current one (a move reads one copy and writes the other).

        Raises:
            TenantNotFound: no such tenant, or it was deleted.
        """
        return self._store_of({**self.get_tenant(tenant_id), "storage_model": model.value})

    def compare_and_set_tenant(self, tenant_id: str, expect: Mapping[str, Any], values: Row) -> bool:
        """Update the tenant row with ``values`` only if every column in ``expect`` still
        holds its value (``None``: is null; a tuple: any of these), in one UPDATE.

        :meth:`update_tenant` compares only ``state``; a move also compares
        ``storage_model`` and ``moving_to``, so two moves, or a move and a deletion,
        cannot both win.

        Returns:
            True if the row was updated.

        Raises:
            StorageError: the database failed.
        """
        won = _bulk.compare_and_set_tenant(self.control_tx, tenant_id, expect, values)
        if won:
            self.cache.changed(tenant_id)
        return won

    def unclaimed_runs(self, tenant_id: str) -> set[str]:
        """Ids of ``tenant_id``'s runs waiting, unclaimed, in the durable run queue.

        Raises:
            StorageError: the database failed.
        """
        return _bulk.unclaimed_runs(self.control_tx, tenant_id)


def _usage_summary_query(tenant_id: str | None, since: datetime | None) -> Any:
    u = s.usage_records
    q = (
        select(
            u.c.tenant_id,
            u.c.model,
            u.c.simulated,
            # Runs, not records: a run executed again after its worker died has a record
            # per attempt that used tokens.
            func.count(u.c.run_id.distinct()).label("runs"),
            func.coalesce(func.sum(u.c.input_tokens), 0).label("input_tokens"),
            func.coalesce(func.sum(u.c.output_tokens), 0).label("output_tokens"),
            func.coalesce(func.sum(u.c.tool_calls), 0).label("tool_calls"),
        )
        .group_by(u.c.tenant_id, u.c.model, u.c.simulated)
        .order_by(u.c.tenant_id, u.c.model)
    )
    if tenant_id is not None:
        q = q.where(u.c.tenant_id == tenant_id)
    if since is not None:
        q = q.where(u.c.at >= since)
    return q


def _audit_values(
    tenant_id: str | None,
    actor: str,
    action: str,
    target: str | None,
    outcome: str,
    detail: Mapping[str, Any] | None,
) -> Row:
    return {
        "tenant_id": tenant_id,
        "id": new_id("au"),
        "at": utcnow(),
        "actor": actor,
        "action": action,
        "target": target,
        "outcome": outcome,
        "detail": dict(detail or {}),
    }


class _Sealer:
    """Encrypts and decrypts one tenant's payloads with its current DEK (AES-256-GCM).

    A sealed payload is stored as the blob itself, in a binary column (format in
    :mod:`patinox.storage._crypto.aead`: 33 bytes more than the UTF-8 plaintext). The AAD
    binds each ciphertext to the tenant, the column (``table``) and the row
    (``record_id``), so a ciphertext copied anywhere else fails to decrypt.
    """

    __slots__ = ("keyring", "tenant_id")

    def __init__(self, keyring: TenantKeyring, tenant_id: str) -> None:
        self.keyring = keyring
        self.tenant_id = tenant_id

    def seal(self, table: str, record_id: str, text: str) -> bytes:
        key = self.keyring.current_key(self.tenant_id)
        return encrypt_str(text, key=key, table=table, record_id=record_id)

    def version(self, stored: bytes | str) -> int:
        """The DEK version ``stored`` was sealed with (0 when it is not a sealed blob)."""
        try:
            return blob_key_version(_stored_blob(stored))
        except DecryptionFailed:
            return 0

    def open(self, table: str, record_id: str, stored: bytes | str | None) -> str | None:
        """The plaintext of ``stored``; ``None`` stays ``None``.

        Raises:
            DecryptionFailed: not a sealed blob (every payload is written sealed, so
                anything else was put there by something else), or it fails
                authentication.
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        if stored is None:
            return None
        return decrypt_str(
            _stored_blob(stored, table),
            key_lookup=self.keyring.key_lookup(self.tenant_id),
            tenant_id=self.tenant_id,
            table=table,
            record_id=record_id,
        )


#: How releases before migration 0005 stored a blob: this prefix, then its base64, as text.
_LEGACY_PREFIX = b"ptxenc1:"


def _stored_blob(stored: bytes | str, table: str | None = None) -> bytes:
    """The blob of a stored payload: the bytes themselves, or a blob in the format before
    migration 0005, which a process of the previous release still writes (as text, or
    its bytes on PostgreSQL) while an upgrade restarts one process after another.

    Raises:
        DecryptionFailed: neither bytes nor text, or a legacy value that is not base64.
    """
    if isinstance(stored, str):
        stored = stored.encode("utf-8")
    if not isinstance(stored, bytes | bytearray | memoryview):
        raise DecryptionFailed("stored payload is not sealed", reason="not_sealed", table=table)
    raw = bytes(stored)
    if not raw.startswith(_LEGACY_PREFIX):
        return raw
    try:
        return base64.b64decode(raw[len(_LEGACY_PREFIX) :], validate=True)
    except binascii.Error as err:
        raise DecryptionFailed("stored payload is not sealed", reason="not_sealed", table=table) from err


@dataclass(frozen=True, slots=True)
class PreparedWrite:
    """Statements with their parameters, payloads already sealed, for
    :meth:`TenantStore.apply`.

    Sealing may read or create the tenant's DEK in a transaction of its own, which must
    not happen inside another open transaction (on SQLite it would wait on that
    transaction's own write lock), so writes that join a transaction are prepared first.
    """

    tenant_id: str
    statements: tuple[tuple[Any, Row], ...]


class TenantStore:
    """Everything one tenant owns. Bound at construction; every statement is scoped here.

    Do not construct directly: use :meth:`SqlBackend.tenant_store`.
    """

    __slots__ = ("_agents_limit", "_cache", "_memory_limit", "_placement", "_sealer", "tenant_id")

    def __init__(
        self,
        placement: Placement,
        sealer: _Sealer,
        *,
        memory_bytes_limit: int | None = None,
        agents_limit: int | None = None,
        cache: TenantCache | None = None,
    ) -> None:
        self._placement = placement
        self._sealer = sealer
        self._memory_limit = memory_bytes_limit
        self._agents_limit = agents_limit
        self._cache = cache or _NO_CACHE
        self.tenant_id = sealer.tenant_id

    # The only places tenant predicates are built.
    def _where(self, table: Table, **eq: Any) -> list[Any]:
        conds = [table.c.tenant_id == self.tenant_id]
        conds += [table.c[k] == v for k, v in eq.items()]
        return conds

    @staticmethod
    def _settable(values: Row) -> Row:
        """``values`` for the SET of an update of this tenant's row, refusing the columns
        that say whose and which row it is (an update sets every column it is given)."""
        keys = sorted(_ROW_KEY_COLUMNS & values.keys())
        if keys:
            raise InvalidRequest(f"cannot change {', '.join(keys)} of a row", field=keys[0])
        return values

    def _bound(self, params: Row) -> Row:
        """``params`` with the store's tenant as ``b_tenant_id``, overriding any value a
        caller put there: every prebuilt statement's tenant comes from here."""
        return {**params, "b_tenant_id": self.tenant_id}

    def _exec(self, conn: Connection, stmt: Any, params: Row) -> Any:
        """Execute a prebuilt statement (module constants above) for the store's tenant."""
        return conn.execute(stmt, self._bound(params))

    def _get(self, conn: Connection, table: Table, what: str, **eq: Any) -> Row:
        row = conn.execute(select(table).where(*self._where(table, **eq))).mappings().first()
        if row is None:
            ident = next(iter(eq.values()))
            raise NotFound(f"{what} {ident!r} not found")
        return dict(row)

    def joins(self, target: Connection | Engine) -> bool:
        """True when this tenant's rows live in the database of ``target`` (pool tenants:
        the shared tables), so its writes may share a control-plane transaction there and
        commit or roll back with it (a run's admission and its settlement)."""
        return self._placement.schema is None and self._placement.engine is target.engine

    def _tx(self, joined: Connection | None = None) -> AbstractContextManager[Connection]:
        """A transaction bound to this tenant, or ``joined`` (see :meth:`joins`) with the
        tenant setting added to it on PostgreSQL.

        Raises:
            ConfigurationError: ``joined`` is a transaction on another database.
        """
        if joined is not None and not self._placement.postgres:
            # Joining on SQLite (every step of a pool tenant's run): errors translated, nothing
            # to set; one object instead of a generator.
            if not self.joins(joined):
                raise ConfigurationError("a tenant store can join only a transaction on its own database")
            return translate_errors(joined)
        return self._bound_tx(joined)

    @contextmanager
    def _bound_tx(self, joined: Connection | None) -> Iterator[Connection]:
        p = self._placement
        if joined is not None:
            if not self.joins(joined):
                raise ConfigurationError("a tenant store can join only a transaction on its own database")
            with translate_errors():
                if p.postgres:
                    joined.execute(_SET_TENANT, {"tenant_id": self.tenant_id})
                yield joined
            return
        with translate_errors(), begin(p.engine) as conn:
            if p.schema is not None:
                conn.execution_options(schema_translate_map={None: p.schema})
            if p.postgres:
                # Transaction-local: it cannot outlive this transaction on a pooled connection.
                conn.execute(_SET_TENANT, {"tenant_id": self.tenant_id})
            yield conn

    # -- agents ---------------------------------------------------------------------

    def create_agent(self, values: Row) -> Row:
        """Insert an agent.

        Raises:
            AlreadyExists: the name is taken in this tenant.
            QuotaExceeded: the tenant already has its ``max_agents`` agents (stores made
                from a tenant context enforce it); fields ``quota``, ``limit``, ``used``,
                ``requested`` (agents). Nothing is written.
        """
        now = utcnow()
        row = {
            **values,
            "tenant_id": self.tenant_id,
            "id": new_id("ag"),
            "created_at": now,
            "updated_at": now,
        }
        try:
            with self._tx() as conn:
                limit = self._agents_limit
                if limit is not None and self._placement.postgres:
                    # Concurrent creators of one tenant take turns, so the count below is exact.
                    conn.execute(_LOCK_TENANT_AGENTS, {"t": self.tenant_id})
                # Insert first (on SQLite this takes the write lock), then count; over the
                # quota, the exception rolls the insert back.
                conn.execute(insert(s.agents).values(**row))
                if limit is not None:
                    count = select(func.count()).select_from(s.agents).where(*self._where(s.agents))
                    total = int(conn.execute(count).scalar_one())
                    if total > limit:
                        raise QuotaExceeded(
                            f"this tenant already has its limit of {limit} agents; delete one to make room",
                            tenant_id=self.tenant_id,
                            quota="max_agents",
                            limit=limit,
                            used=total - 1,
                            requested=1,
                        )
        except AlreadyExists as err:
            raise AlreadyExists(f"an agent named {values['name']!r} already exists") from err
        self._cache.changed(self.tenant_id)
        return row

    def get_agent(self, agent_id: str) -> Row:
        """The agent (a copy), served from the cache when nothing changed since it was
        read. Raises :class:`NotFound` (missing and foreign ids alike)."""
        key = ("agent", self.tenant_id, agent_id)
        seen = self._cache.epoch()
        cached = self._cache.get(key)
        if cached is MISS:
            with self._tx() as conn:
                row = self._exec(conn, _GET_AGENT, {"b_id": agent_id}).mappings().first()
            if row is None:
                raise NotFound(f"agent {agent_id!r} not found")
            cached = dict(row)
            self._cache.put(self.tenant_id, key, cached, seen)
        return _copy_row(cached)

    def list_agents(self) -> list[Row]:
        """This tenant's agents by name."""
        with self._tx() as conn:
            q = select(s.agents).where(*self._where(s.agents)).order_by(s.agents.c.name)
            return [dict(r) for r in conn.execute(q).mappings()]

    def update_agent(self, agent_id: str, values: Row) -> Row:
        """Update an agent's fields. Raises :class:`NotFound` / :class:`AlreadyExists`."""
        try:
            with self._tx() as conn:
                n = conn.execute(
                    update(s.agents)
                    .where(*self._where(s.agents, id=agent_id))
                    .values(**self._settable(values), updated_at=utcnow())
                ).rowcount
                if n != 1:
                    raise NotFound(f"agent {agent_id!r} not found")
                row = self._get(conn, s.agents, "agent", id=agent_id)
        except AlreadyExists as err:
            raise AlreadyExists(f"an agent named {values.get('name')!r} already exists") from err
        self._cache.changed(self.tenant_id)
        return row

    def delete_agent(self, agent_id: str) -> None:
        """Delete an agent and its runs (usage records are kept). Raises :class:`NotFound`."""
        with self._tx() as conn:
            conn.execute(delete(s.runs).where(*self._where(s.runs, agent_id=agent_id)))
            if conn.execute(delete(s.agents).where(*self._where(s.agents, id=agent_id))).rowcount != 1:
                raise NotFound(f"agent {agent_id!r} not found")
        self._cache.changed(self.tenant_id)

    # -- runs -----------------------------------------------------------------------

    def create_run(self, values: Row) -> Row:
        """Insert a run row (status ``queued`` or ``running``); returns it with its id.

        ``input`` is stored encrypted (AAD: tenant, ``runs.input``, run id).
        """
        row, write = self.prepare_run(values)
        self.apply(write)
        return row

    def prepare_run(self, values: Row) -> tuple[Row, PreparedWrite]:
        """The run row :meth:`create_run` would insert, and its sealed insert for
        :meth:`apply` (to write it inside another transaction, see :meth:`joins`)."""
        row = {"created_at": utcnow(), "id": new_id("run"), **values, "tenant_id": self.tenant_id}
        stored = {**row, "input": self._sealer.seal("runs.input", row["id"], row["input"])}
        return row, PreparedWrite(self.tenant_id, ((_INSERT_RUN, stored),))

    def apply(self, write: PreparedWrite, *, conn: Connection | None = None) -> None:
        """Execute a prepared write in one transaction, or in ``conn`` (see :meth:`joins`).

        Raises:
            ConfigurationError: ``write`` was prepared by another tenant's store.
        """
        if write.tenant_id != self.tenant_id:
            raise ConfigurationError("a prepared write belongs to the store that prepared it")
        with self._tx(conn) as conn:
            for stmt, params in write.statements:
                fast_write(conn, stmt, self._bound(params))

    def _open_run(self, row: Row) -> Row:
        row["input"] = self._sealer.open("runs.input", row["id"], row["input"])
        row["output"] = self._sealer.open("runs.output", row["id"], row["output"])
        return row

    def get_run(self, run_id: str) -> Row:
        """The run. Raises :class:`NotFound` (missing and foreign ids alike)."""
        with self._tx() as conn:
            found = self._exec(conn, _GET_RUN, {"b_id": run_id}).mappings().first()
        if found is None:
            raise NotFound(f"run {run_id!r} not found")
        return self._open_run(dict(found))

    def list_runs(
        self,
        *,
        agent_id: str | None = None,
        limit: int = 50,
        before: str | None = None,
        max_bytes: int | None = None,
    ) -> list[Row]:
        """This tenant's newest runs first.

        Args:
            agent_id: only this agent's runs.
            limit: at most this many runs.
            before: only runs older than this run (a cursor: the last id of a page).
            max_bytes: stop once the runs returned hold this many bytes of stored input
                and output (at least one run is returned), so one listing cannot make the
                process decrypt and hold an unbounded amount for one tenant.

        Raises:
            NotFound: ``before`` is not a run of this tenant.
        """
        r = s.runs
        conds = self._where(r, **({"agent_id": agent_id} if agent_id else {}))
        newest_first = (r.c.created_at.desc(), r.c.id.desc())
        with self._tx() as conn:
            if before is not None:
                mark = self._exec(conn, _GET_RUN, {"b_id": before}).mappings().first()
                if mark is None:
                    raise NotFound(f"run {before!r} not found")
                at = mark["created_at"]
                conds.append(or_(r.c.created_at < at, and_(r.c.created_at == at, r.c.id < before)))
            if max_bytes is not None:
                # Sizes first, then the payloads of the runs within the budget only: reading
                # every row of the page and cutting afterwards still held them all at once.
                size = func.length(r.c.input) + func.coalesce(func.length(r.c.output), 0)
                sized = conn.execute(select(r.c.id, size).where(*conds).order_by(*newest_first).limit(limit))
                ids: list[str] = []
                held = 0
                for run_id, stored in sized:
                    held += int(stored)
                    if ids and held > max_bytes:
                        break
                    ids.append(run_id)
                conds.append(r.c.id.in_(ids))
            q = select(r).where(*conds).order_by(*newest_first).limit(limit)
            rows = [dict(x) for x in conn.execute(q).mappings()]
        return [self._open_run(row) for row in rows]

    def update_run(self, run_id: str, values: Row) -> None:
        """Update a run's fields. Raises :class:`NotFound`."""
        with self._tx() as conn:
            n = self._exec(conn, _UPDATE_RUN, {**self._settable(values), "b_id": run_id}).rowcount
        if n != 1:
            raise NotFound(f"run {run_id!r} not found")

    def discard_run(self, run_id: str) -> None:
        """Remove a run that was never queued (its admission failed after the row was
        written); idempotent."""
        with self._tx() as conn:
            conn.execute(delete(s.runs).where(*self._where(s.runs, id=run_id)))

    def settle_run(self, run_id: str, values: Row, *, usage: Row | None, audit: Row) -> None:
        """Finish a run in one transaction: the run's final fields (``output`` encrypted), its
        usage record, its audit record."""
        self.apply(self.prepare_settlement(run_id, values, usage=usage, audit=audit))

    def prepare_settlement(
        self, run_id: str, values: Row, *, usage: Row | None, audit: Row, attempt: Row | None = None
    ) -> PreparedWrite:
        """The sealed statements of :meth:`settle_run`, for :meth:`apply`.

        Args:
            attempt: for a run a worker executed, how its attempt ended: ``attempt`` (its
                number, see :meth:`start_attempt`), ``outcome``, ``ended_at`` and its
                ``input_tokens``, ``output_tokens``, ``tool_calls``. The attempt is ended
                with the run, and the usage record (``usage["attempt"]``, the same number)
                replaces any record of that attempt (:meth:`interrupt_attempt`'s).
        """
        if values.get("output") is not None:
            values = {**values, "output": self._sealer.seal("runs.output", run_id, values["output"])}
        statements: list[tuple[Any, Row]] = [(_UPDATE_RUN, {**self._settable(values), "b_id": run_id})]
        if attempt is not None:
            ended = {k: v for k, v in attempt.items() if k != "attempt"}
            statements.append((_END_ATTEMPT, {**ended, "b_run": run_id, "b_attempt": attempt["attempt"]}))
        if usage is not None:
            record = {**usage, "tenant_id": self.tenant_id, "id": new_id("us"), "run_id": run_id}
            insert_usage = (
                _INSERT_USAGE if attempt is None else _UPSERT_ATTEMPT_USAGE[self._placement.postgres]
            )
            statements.append((insert_usage, {**record, "at": utcnow()}))
        statements.append((_INSERT_AUDIT, self._audit(**audit)))
        return PreparedWrite(self.tenant_id, tuple(statements))

    # -- attempts of queued runs ------------------------------------------------------

    def start_attempt(self, run_id: str, *, holder: str) -> int:
        """Record that ``holder`` (a worker) starts executing the run now: the run becomes
        ``running`` with ``started_at`` now, and gets its next attempt, open until it ends.
        An earlier attempt still open (its worker died, and the record of that is not
        written yet) is closed as ``interrupted`` (:meth:`interrupt_attempt` still adds
        what it used).

        Returns:
            The attempt's number: 1 for the run's first execution, then 2, 3, ...

        Raises:
            NotFound: no such run.
        """
        a = s.run_attempts
        last_error: AlreadyExists | None = None
        for _ in range(3):  # two workers starting one run at once: the later one numbers again
            now = utcnow()
            try:
                with self._tx() as conn:
                    started = {"status": "running", "started_at": now, "b_id": run_id}
                    if self._exec(conn, _UPDATE_RUN, started).rowcount != 1:
                        raise NotFound(f"run {run_id!r} not found")
                    open_ = [*self._where(a, run_id=run_id), a.c.outcome.is_(None)]
                    conn.execute(update(a).where(*open_).values(outcome="interrupted", ended_at=now))
                    last = conn.execute(select(func.max(a.c.attempt)).where(*self._where(a, run_id=run_id)))
                    number = int(last.scalar() or 0) + 1
                    conn.execute(
                        insert(a).values(
                            tenant_id=self.tenant_id,
                            id=new_id("at"),
                            run_id=run_id,
                            attempt=number,
                            holder=holder,
                            started_at=now,
                            ended_at=None,
                            outcome=None,
                            input_tokens=0,
                            output_tokens=0,
                            tool_calls=0,
                        )
                    )
                return number
            except AlreadyExists as err:
                last_error = err
        assert last_error is not None
        raise last_error

    def interrupt_attempt(
        self,
        run_id: str,
        *,
        holder: str,
        input_tokens: int,
        output_tokens: int,
        tool_calls: int,
        audit: Row,
    ) -> int | None:
        """Record, in one transaction, that ``holder``'s attempt of the run was cut short
        (its lease expired and the run went back to the queue): the attempt ends
        ``interrupted`` with the usage it had recorded (tokens, tool calls), which gets a
        usage record when it used tokens; and ``audit`` is appended (its ``detail`` gains
        the attempt's number). An attempt its worker already ended is left as it is (the
        worker was alive and its record counts everything).

        Returns:
            The attempt's number, or ``None`` when there is none to mark (the worker died
            before it started the run, or already ended it).
        """
        a, r = s.run_attempts, s.runs
        tokens = input_tokens + output_tokens
        with self._tx() as conn:
            latest = conn.execute(
                select(a.c.attempt, a.c.outcome, a.c.started_at)
                .where(*self._where(a, run_id=run_id, holder=holder))
                .order_by(a.c.attempt.desc())
                .limit(1)
            ).first()
            number: int | None = None
            # Closed already by the run's next start (as interrupted, without its usage),
            # or still open: either way it is this holder's attempt whose usage this is.
            if latest is not None and (
                latest.outcome is None or (latest.outcome == "interrupted" and tokens)
            ):
                number = int(latest.attempt)
                now = utcnow()
                ended: Row = {"outcome": "interrupted", "ended_at": now} if latest.outcome is None else {}
                conn.execute(
                    update(a)
                    .where(*self._where(a, run_id=run_id, attempt=number))
                    .where(or_(a.c.outcome.is_(None), a.c.outcome == "interrupted"))
                    .values(
                        **ended, input_tokens=input_tokens, output_tokens=output_tokens, tool_calls=tool_calls
                    )
                )
                run = conn.execute(select(r.c.model, r.c.simulated).where(*self._where(r, id=run_id))).first()
                if tokens and run is not None:
                    record = {
                        "tenant_id": self.tenant_id,
                        "id": new_id("us"),
                        "run_id": run_id,
                        "attempt": number,
                        "at": now,
                        "model": run.model,
                        "simulated": run.simulated,
                        "input_tokens": input_tokens,
                        "output_tokens": output_tokens,
                        "tool_calls": tool_calls,
                        "duration_ms": (now - latest.started_at).total_seconds() * 1000,
                    }
                    conn.execute(_UPSERT_ATTEMPT_USAGE[self._placement.postgres], record)
            detail = {**audit.get("detail", {}), "attempt": number}
            conn.execute(_INSERT_AUDIT, self._audit(**{**audit, "detail": detail}))
        return number

    def list_attempts(self, run_ids: list[str]) -> dict[str, list[Row]]:
        """The attempts of these runs of this tenant (a foreign or missing id has none),
        per run id, first attempt first."""
        a = s.run_attempts
        found: dict[str, list[Row]] = {run_id: [] for run_id in run_ids}
        if not run_ids:
            return found
        q = select(a).where(*self._where(a), a.c.run_id.in_(run_ids)).order_by(a.c.run_id, a.c.attempt)
        with self._tx() as conn:
            for row in conn.execute(q).mappings():
                found[row["run_id"]].append(dict(row))
        return found

    # -- key rotation -----------------------------------------------------------------

    #: Sealed columns: (table, key column, sealed column, AAD table name).
    _SEALED = (
        ("memory", "key", "value", "memory.value"),
        ("runs", "id", "input", "runs.input"),
        ("runs", "id", "output", "runs.output"),
    )

    def reencrypt(self, progress: Callable[[int, int], None] | None = None, batch: int = 200) -> int:
        """Re-seal every payload of this tenant that is not under its current DEK version
        (the background job after a DEK rotation). Each row is updated only if it still
        holds the value read (compare-and-set), so concurrent writes are never lost.

        Args:
            progress: called with (rows done, rows in all) as it goes.
            batch: rows read per query.

        Returns:
            Rows re-sealed.
        """
        current = self._sealer.keyring.current_key(self.tenant_id).version
        todo: list[tuple[Table, str, str, str, Any, bytes | str]] = []
        for table_name, key_col, col, aad in self._SEALED:
            table = s.metadata.tables[table_name]
            with self._tx() as conn:
                cols = select(table.c[key_col], table.c[col])
                rows = conn.execute(cols.where(*self._where(table), table.c[col].is_not(None))).all()
            todo += [(table, key_col, col, aad, k, v) for k, v in rows if self._sealer.version(v) < current]
        done = 0
        for start in range(0, len(todo), batch):
            with self._tx() as conn:
                for table, key_col, col, aad, key, old in todo[start : start + batch]:
                    fresh = self._sealer.seal(aad, str(key), self._sealer.open(aad, str(key), old) or "")
                    # Compared as read: a legacy value SQLite kept as text is not bytes.
                    held = literal(old, Text()) if isinstance(old, str) else old
                    conn.execute(
                        update(table)
                        .where(*self._where(table), table.c[key_col] == key, table.c[col] == held)
                        .values({col: fresh})
                    )
                    done += 1
            if progress is not None:
                progress(done, len(todo))
        return done

    # -- memory (implements patinox.agents.MemoryStore) -------------------------------

    def memory_get(self, key: str) -> str | None:
        """The value under ``key``, or ``None`` (values are stored encrypted; keys are not)."""
        with self._tx() as conn:
            v = conn.execute(select(s.memory.c.value).where(*self._where(s.memory, key=key))).scalar()
        return self._sealer.open("memory.value", key, v)

    def memory_put(self, key: str, value: str) -> None:
        """Set ``key`` to ``value`` (insert or replace). Idempotent: putting the same value
        again leaves the same memory (only ``updated_at`` moves) and the same stored size,
        so a run executed again after its worker died may repeat its writes.

        Raises:
            InvalidRequest: the key is not 1-200 characters, or holds a NUL character (as
                the HTTP route refuses; PostgreSQL cannot store one in text).
            QuotaExceeded: the tenant's stored memory (encrypted size, bytes) would pass its
                ``memory_bytes`` limit (stores made from a tenant context enforce it).
        """
        if not 1 <= len(key) <= 200:
            raise InvalidRequest("memory keys are 1-200 characters", field="key")
        if "\x00" in key:
            raise InvalidRequest("memory keys cannot hold NUL characters", field="key")
        sealed = self._sealer.seal("memory.value", key, value)
        m = s.memory
        with self._tx() as conn:
            if self._memory_limit is not None and self._placement.postgres:
                # Concurrent writers of one tenant take turns, so the total below is exact.
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": self.tenant_id})
            # Write first (on SQLite this takes the write lock), then check the new total;
            # over the quota, the exception rolls the write back.
            n = conn.execute(
                update(m).where(*self._where(m, key=key)).values(value=sealed, updated_at=utcnow())
            ).rowcount
            if n == 0:
                conn.execute(
                    insert(m).values(tenant_id=self.tenant_id, key=key, value=sealed, updated_at=utcnow())
                )
            if self._memory_limit is not None:
                total = int(conn.execute(_memory_bytes(conn), {"b_tenant_id": self.tenant_id}).scalar_one())
                if total > self._memory_limit:
                    entry = len(sealed) + len(key.encode("utf-8"))
                    raise QuotaExceeded(
                        f"agent memory would pass its limit of {self._memory_limit} bytes",
                        tenant_id=self.tenant_id,
                        quota="memory_bytes",
                        limit=self._memory_limit,
                        used=total - entry,
                        requested=entry,
                    )

    def memory_delete(self, key: str) -> None:
        """Remove ``key``. Raises :class:`NotFound`."""
        with self._tx() as conn:
            if conn.execute(delete(s.memory).where(*self._where(s.memory, key=key))).rowcount != 1:
                raise NotFound(f"memory key {key!r} not found")

    def memory_list(self, prefix: str = "", limit: int = 100) -> list[str]:
        """Keys starting with ``prefix``, sorted, at most ``limit``."""
        q = select(s.memory.c.key).where(*self._where(s.memory))
        if prefix:
            q = q.where(s.memory.c.key.startswith(prefix, autoescape=True))
        with self._tx() as conn:
            return [str(k) for k in conn.execute(q.order_by(s.memory.c.key).limit(limit)).scalars()]

    # -- audit and usage ------------------------------------------------------------

    def _audit(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        detail: Mapping[str, Any] | None = None,
    ) -> Row:
        return _audit_values(self.tenant_id, actor, action, target, outcome, detail)

    def append_audit(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        detail: Mapping[str, Any] | None = None,
    ) -> Row:
        """Append one audit record for this tenant."""
        values = self._audit(actor=actor, action=action, target=target, outcome=outcome, detail=detail)
        with self._tx() as conn:
            conn.execute(_INSERT_AUDIT, values)
        return values

    def list_audit(self, *, limit: int = 100, after_seq: int = 0) -> list[Row]:
        """This tenant's audit records, oldest first, after sequence number ``after_seq``.

        ``seq`` is the record's number within this tenant's log (1, 2, ...), not the
        table's counter: on the pool model that counter is shared by every tenant, and its
        gaps would count the neighbours' audited actions. Records are append-only, so a
        record keeps its number.
        """
        q = (
            select(s.audit_log)
            .where(*self._where(s.audit_log))
            .order_by(s.audit_log.c.seq)
            .offset(after_seq)
            .limit(limit)
        )
        with self._tx() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        for number, row in enumerate(rows, start=after_seq + 1):
            row["seq"] = number
        return rows

    def usage_summary(self, *, since: datetime | None = None) -> list[Row]:
        """This tenant's usage totals per model since ``since``."""
        with self._tx() as conn:
            q = _usage_summary_query(self.tenant_id, since)
            return [dict(r) for r in conn.execute(q).mappings()]

    def list_usage(self, *, since: datetime | None = None, limit: int = 1000) -> list[Row]:
        """This tenant's usage records since ``since``, oldest first."""
        q = select(s.usage_records).where(*self._where(s.usage_records))
        if since is not None:
            q = q.where(s.usage_records.c.at >= since)
        with self._tx() as conn:
            return [dict(r) for r in conn.execute(q.order_by(s.usage_records.c.at).limit(limit)).mappings()]

    # -- bulk (export, import, moves) -------------------------------------------------

    def bulk(self) -> _bulk.BulkRows:
        """This tenant's rows in this placement, a table at a time: paged reads (payloads
        opened or as stored), bulk inserts (sealed here or kept), delete-all, counts and
        fingerprints. See :class:`~patinox.storage._bulk.BulkRows`."""
        return _bulk.BulkRows(self._placement, self._tx, self._sealer, self._SEALED, tenant_id=self.tenant_id)
