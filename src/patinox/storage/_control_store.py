"""The control plane: :class:`SqlBackend`, used by operator code (tenant manager, key
verification, operator audit and usage views), and the factory of tenant-bound stores.

Its methods take explicit tenant ids because operators act *on* tenants; everything a
tenant owns is read and written through a :class:`~patinox.storage.TenantStore` it makes.
All datetimes are timezone-aware UTC. Driver errors surface as
:class:`~patinox.errors.StorageError` with the original chained.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, delete, insert, inspect, select, update
from sqlalchemy.engine import make_url

from patinox.errors import AlreadyExists, NotFound, StorageError, TenantNotFound
from patinox.storage import _bulk
from patinox.storage import _schema as s
from patinox.storage._cache import MISS, TenantCache, copy_row, epoch_for_url
from patinox.storage._crypto.keyring import TenantKeyring
from patinox.storage._crypto.providers import KeyProvider
from patinox.storage._dekstore import SqlDekStore
from patinox.storage._placement import Placements
from patinox.storage._schema import utcnow
from patinox.storage._sealer import Sealer
from patinox.storage._statements import (
    FIND_KEY,
    SET_CONTROL,
    TENANT_COLUMNS,
    audit_values,
    usage_summary_query,
)
from patinox.storage._tenant_store import TenantStore
from patinox.storage.engine import (
    begin,
    dispose,
    head_revision,
    make_engine,
    migrate,
    normalise_url,
    translate_errors,
)
from patinox.storage.records import (
    ApiKeyRecord,
    AuditRecord,
    Changes,
    KeyTenantRecord,
    StoredApiKeyRecord,
    TenantRecord,
    UsageTotals,
)
from patinox.tenancy import StorageModel, TenantContext, current_tenant

__all__ = ["SqlBackend", "open_backend"]

#: Seconds the purge retries a WAL truncation that another checkpoint made busy.
_TRUNCATE_WAIT_S = 5.0


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
        self.keyring = TenantKeyring(SqlDekStore(self.transaction), key_provider)
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
    def transaction(self) -> Iterator[Connection]:
        """A control-plane transaction on the deployment's main database: committed when
        the block ends, rolled back when it raises. On PostgreSQL it declares itself with
        ``patinox.scope = 'control'`` (see the class).

        For control-plane components that keep their own statements on control-plane
        tables (the run queue, the quota ledger, the DEK store); tenant rows are read and
        written through a :class:`TenantStore` instead.

        Raises:
            StorageError: the database refused or failed (the driver error is chained);
                the transaction is rolled back.
        """
        with translate_errors(), begin(self.engine) as conn:
            if self._postgres:
                conn.execute(SET_CONTROL)
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
        return self.transaction()

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
            Sealer(self.keyring, ctx.tenant_id),
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

    def _store_of(self, tenant: Mapping[str, Any]) -> TenantStore:
        tenant_id = tenant["id"]
        placement = self.placements.for_tenant(tenant_id, StorageModel(tenant["storage_model"]))
        return TenantStore(placement, Sealer(self.keyring, tenant_id), cache=self.cache)

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

    def insert_tenant(self, values: TenantRecord) -> TenantRecord:
        """Insert a tenant row. Raises :class:`AlreadyExists` when the live name is taken."""
        try:
            with self.transaction() as conn:
                conn.execute(insert(s.tenants).values(**values))
        except AlreadyExists as err:
            raise AlreadyExists(f"a tenant named {values['name']!r} already exists") from err
        return values

    def get_tenant(self, tenant_id: str, *, include_deleted: bool = False) -> TenantRecord:
        """The tenant row. Raises :class:`TenantNotFound` (also for deleted ones by default)."""
        with self.transaction() as conn:
            row = conn.execute(select(s.tenants).where(s.tenants.c.id == tenant_id)).mappings().first()
        if row is None or (row["state"] == "deleted" and not include_deleted):
            raise TenantNotFound(f"tenant {tenant_id!r} not found", tenant_id=tenant_id)
        return cast(TenantRecord, dict(row))

    def list_tenants(self, *, include_deleted: bool = False) -> list[TenantRecord]:
        """All tenants, oldest first."""
        q = select(s.tenants).order_by(s.tenants.c.created_at, s.tenants.c.id)
        if not include_deleted:
            q = q.where(s.tenants.c.state != "deleted")
        with self.transaction() as conn:
            return cast(list[TenantRecord], [dict(r) for r in conn.execute(q).mappings()])

    def update_tenant(
        self, tenant_id: str, values: Changes, *, expect_state: str | None = None
    ) -> TenantRecord:
        """Update a tenant row, optionally only if it is still in ``expect_state``.

        Raises:
            TenantNotFound: no such tenant, or its state changed under us.
        """
        q = update(s.tenants).where(s.tenants.c.id == tenant_id)
        if expect_state is not None:
            q = q.where(s.tenants.c.state == expect_state)
        with self.transaction() as conn:
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
        with self.transaction() as conn:
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

    def insert_api_key(self, values: StoredApiKeyRecord) -> StoredApiKeyRecord:
        """Insert an API key row (hash only; the secret is never stored)."""
        with self.transaction() as conn:
            conn.execute(insert(s.api_keys).values(**values))
        return values

    def find_api_key(self, prefix: str) -> tuple[StoredApiKeyRecord, KeyTenantRecord | None] | None:
        """The key row with ``prefix`` and its tenant row (``None`` for operator keys).

        Served from :attr:`cache` when nothing changed since it was read; the rows are
        copies the caller may change."""
        seen = self.cache.epoch()
        cached: tuple[StoredApiKeyRecord, KeyTenantRecord | None] = self.cache.get(("key", prefix))
        if cached is MISS:
            with self.transaction() as conn:
                row = conn.execute(FIND_KEY, {"b_prefix": prefix}).mappings().first()
            if row is None:
                return None
            data = dict(row)
            joined = {name: data.pop(f"t_{name}") for name in TENANT_COLUMNS}
            tenant = None if data["tenant_id"] is None else {"id": data["tenant_id"], **joined}
            cached = (cast(StoredApiKeyRecord, data), cast(KeyTenantRecord | None, tenant))
            self.cache.put(data["tenant_id"], ("key", prefix), cached, seen)
        key, owner = cached
        return copy_row(key), None if owner is None else copy_row(owner)

    def key_may(self, key_id: str, tenant_id: str, scope: str) -> bool:
        """True when ``key_id`` is a live (unrevoked) key of ``tenant_id`` holding ``scope``."""
        k = s.api_keys
        with self.transaction() as conn:
            row = conn.execute(
                select(k.c.scopes).where(
                    k.c.id == key_id, k.c.tenant_id == tenant_id, k.c.revoked_at.is_(None)
                )
            ).first()
        return row is not None and scope in row[0]

    def list_api_keys(self, tenant_id: str | None) -> list[ApiKeyRecord]:
        """Keys of one tenant (or operator keys when ``tenant_id`` is None), no hashes."""
        cond = s.api_keys.c.tenant_id.is_(None) if tenant_id is None else s.api_keys.c.tenant_id == tenant_id
        q = select(s.api_keys).where(cond).order_by(s.api_keys.c.created_at)
        with self.transaction() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        for r in rows:
            r.pop("secret_hash")
        return cast(list[ApiKeyRecord], rows)

    def get_api_key(self, key_id: str, tenant_id: str | None) -> ApiKeyRecord:
        """One key of ``tenant_id`` (operator key when ``None``), revoked or not, no hash.

        Raises:
            NotFound: not a key of that tenant (another tenant's key alike).
        """
        k = s.api_keys
        cond = k.c.tenant_id.is_(None) if tenant_id is None else k.c.tenant_id == tenant_id
        with self.transaction() as conn:
            row = conn.execute(select(k).where(k.c.id == key_id, cond)).mappings().first()
        if row is None:
            raise NotFound(f"api key {key_id!r} not found", key_id=key_id)
        out = dict(row)
        out.pop("secret_hash")
        return cast(ApiKeyRecord, out)

    def expire_api_key(self, key_id: str, tenant_id: str | None, expires_at: datetime) -> ApiKeyRecord:
        """Make a live key of ``tenant_id`` (operator key when ``None``) expire at
        ``expires_at`` (UTC), or earlier if it already would.

        Raises:
            NotFound: not a live key of that tenant.
        """
        k = s.api_keys
        cond = k.c.tenant_id.is_(None) if tenant_id is None else k.c.tenant_id == tenant_id
        with self.transaction() as conn:
            row = (
                conn.execute(select(k).where(k.c.id == key_id, cond, k.c.revoked_at.is_(None)))
                .mappings()
                .first()
            )
            if row is None:
                raise NotFound(f"api key {key_id!r} not found", key_id=key_id)
            if row["expires_at"] is None or row["expires_at"] > expires_at:
                conn.execute(update(k).where(k.c.id == key_id).values(expires_at=expires_at))
            out = dict(conn.execute(select(k).where(k.c.id == key_id)).mappings().one())
        self.cache.changed(tenant_id)
        out.pop("secret_hash")
        return cast(ApiKeyRecord, out)

    def touch_api_key(self, key_id: str, at: datetime) -> None:
        """Record that ``key_id`` was used at ``at`` (UTC). Empties no cache: the time of
        last use is read by listings, never by authentication."""
        k = s.api_keys
        with self.transaction() as conn:
            conn.execute(update(k).where(k.c.id == key_id).values(last_used_at=at))

    def revoke_api_key(self, key_id: str, tenant_id: str | None) -> ApiKeyRecord:
        """Mark a key revoked. Raises :class:`NotFound` if it is not that tenant's key."""
        cond = s.api_keys.c.tenant_id.is_(None) if tenant_id is None else s.api_keys.c.tenant_id == tenant_id
        with self.transaction() as conn:
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
        return cast(ApiKeyRecord, out)

    # -- operator views -------------------------------------------------------------

    def append_operator_audit(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """An operator-level audit record (tenant id NULL): kept after a tenant is deleted."""
        values = audit_values(None, actor, action, target, outcome, detail)
        with self.transaction() as conn:
            conn.execute(insert(s.audit_log).values(**values))
        return values

    def list_audit(
        self,
        tenant_id: str | None,
        *,
        limit: int = 100,
        after_seq: int = 0,
    ) -> list[AuditRecord]:
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
        with self.transaction() as conn:
            rows = conn.execute(q.order_by(s.audit_log.c.seq).limit(limit)).mappings()
            return cast(list[AuditRecord], [dict(r) for r in rows])

    def _separate_tenants(self) -> list[TenantRecord]:
        """Active and suspended tenants stored outside the shared tables (bridge, silo); a
        tenant being deleted is left out (its storage may be gone already)."""
        return [
            t
            for t in self.list_tenants()
            if t["storage_model"] != StorageModel.POOL.value and t["state"] in ("active", "suspended")
        ]

    def usage_summary(self, tenant_id: str | None, *, since: datetime | None = None) -> list[UsageTotals]:
        """Usage totals per tenant and model since ``since`` (every tenant when ``tenant_id``
        is None). A tenant being deleted has none (``[]``).

        Raises:
            TenantNotFound: no such tenant, or it was deleted (as for an id never issued).
        """
        if tenant_id is not None:
            store = self._records_of(tenant_id)
            return [] if store is None else store.usage_summary(since=since)
        with self.transaction() as conn:
            rows = cast(
                list[UsageTotals],
                [dict(r) for r in conn.execute(usage_summary_query(None, since)).mappings()],
            )
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

    def compare_and_set_tenant(self, tenant_id: str, expect: Mapping[str, Any], values: Changes) -> bool:
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
