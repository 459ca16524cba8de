"""Where a tenant's rows live: pool (shared tables), bridge (schema), silo (database/file).

A :class:`Placement` is an engine plus an optional schema. :class:`Placements` resolves
one per tenant, creates the schema/database/file when a tenant is created
(:meth:`Placements.provision`) and removes it when the tenant is deleted
(:meth:`Placements.destroy`). Engines of silo tenants are cached per tenant, at most
``max_silo_engines`` at a time (least recently used closed first).

Only :meth:`Placements.provision` creates a schema, database or file. Everything else
opens what exists or fails (:class:`~patinox.errors.StorageError`): a SQLite silo file is
opened ``mode=rw``, which never creates it; a dropped PostgreSQL database cannot be
connected to; a dropped bridge schema holds no tables. So a late reader or writer of a
deleted tenant (a stale tenant context, another process's cached engine, a worker's
expired claim) never brings its storage back.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, text

from patinox.errors import ConfigurationError, InvalidRequest
from patinox.storage.engine import (
    current_revision,
    database_name,
    dispose,
    is_postgres,
    make_engine,
    migrate,
    normalise_url,
    translate_errors,
    with_database,
)
from patinox.tenancy import StorageModel, looks_like_id


@dataclass(frozen=True)
class Placement:
    """An engine and, for bridge tenants, the schema holding the tenant's tables."""

    engine: Engine
    schema: str | None = None
    postgres: bool = False


class Placements:
    """Resolve, provision and destroy tenant placements for one deployment.

    Args:
        app_url: the deployment's database URL (application role on PostgreSQL).
        owner_url: the owner role's URL (PostgreSQL DDL); the same as ``app_url`` on SQLite.
        app_role: the application role to grant access to new schemas/databases.
        main: the engine of ``app_url`` (shared, pool tenants).
    """

    def __init__(
        self,
        *,
        app_url: str,
        owner_url: str,
        app_role: str | None,
        main: Engine,
        owner: Engine,
        max_silo_engines: int = 64,
    ) -> None:
        self.app_url = app_url
        self.owner_url = owner_url
        self.app_role = app_role
        self.main = main
        self.owner = owner
        self.postgres = is_postgres(app_url)
        #: Silo engines by tenant id, with the (device, inode) of the SQLite file each opened.
        self._silos: OrderedDict[str, tuple[Engine, tuple[int, int] | None]] = OrderedDict()
        self._max = max_silo_engines
        self._lock = threading.Lock()

    def supported(self) -> frozenset[StorageModel]:
        """Storage models this deployment offers (bridge needs PostgreSQL; silo needs a file or server)."""
        if self.postgres:
            return frozenset(StorageModel)
        if self.app_url in ("sqlite://", "sqlite:///:memory:"):
            return frozenset({StorageModel.POOL})
        return frozenset({StorageModel.POOL, StorageModel.SILO})

    def require(self, model: StorageModel) -> None:
        """Raise :class:`InvalidRequest` (422) if ``model`` is not offered here."""
        if model not in self.supported():
            raise InvalidRequest(
                f"storage model {model.value!r} is not available on this database; available: "
                f"{', '.join(sorted(m.value for m in self.supported()))}",
                field="storage_model",
            )

    def for_tenant(self, tenant_id: str, model: StorageModel) -> Placement:
        """The placement of ``tenant_id`` stored under ``model``."""
        if model is StorageModel.POOL:
            return Placement(self.main, None, self.postgres)
        _check_tenant_id(tenant_id)
        if model is StorageModel.BRIDGE:
            return Placement(self.main, tenant_id, True)
        return Placement(self._silo_engine(tenant_id), None, self.postgres)

    # -- silo engines -------------------------------------------------------------------

    def _silo_url(self, tenant_id: str, *, owner: bool = False) -> str:
        base = self.owner_url if owner else self.app_url
        if self.postgres:
            return with_database(base, f"{database_name(base)}_{tenant_id}")
        # A URI filename opened mode=rw: SQLite opens the file only if it exists, so an
        # engine of a deleted tenant never re-creates it (provision() makes the file).
        # Quoted twice: SQLAlchemy decodes the URL once, SQLite the URI once more.
        uri = quote(self._silo_path(tenant_id).absolute().as_uri(), safe="/:")
        return f"sqlite:///{uri}?mode=rw&uri=true"

    def _silo_path(self, tenant_id: str) -> Path:
        main = Path(self.app_url.removeprefix("sqlite:///"))
        return main.parent / "tenants" / f"{tenant_id}.db"

    def _silo_engine(self, tenant_id: str) -> Engine:
        stale: Engine | None = None
        with self._lock:
            cached = self._silos.get(tenant_id)
            if cached is not None:
                if cached[1] == self._file_identity(tenant_id):
                    self._silos.move_to_end(tenant_id)
                    return cached[0]
                # SQLite: the file was removed (the tenant deleted or moved away, perhaps
                # by another process) or replaced since this engine opened it; its
                # connections would go on reading and writing the unlinked file.
                stale = self._silos.pop(tenant_id)[0]
            engine = make_engine(self._silo_url(tenant_id), pool_size=2)
            self._silos[tenant_id] = (engine, self._file_identity(tenant_id))
            while len(self._silos) > self._max:
                _, (old, _) = self._silos.popitem(last=False)
                dispose(old)
        if stale is not None:
            dispose(stale)
        return engine

    def _file_identity(self, tenant_id: str) -> tuple[int, int] | None:
        """SQLite: the silo file's (device, inode), ``None`` when it does not exist (and on
        PostgreSQL, where a dropped database ends every session in it)."""
        if self.postgres:
            return None
        try:
            st = self._silo_path(tenant_id).stat()
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _forget_silo(self, tenant_id: str) -> None:
        with self._lock:
            cached = self._silos.pop(tenant_id, None)
        if cached is not None:
            dispose(cached[0])

    # -- lifecycle ----------------------------------------------------------------------

    def provision(self, tenant_id: str, model: StorageModel) -> None:
        """Create and migrate the tenant's schema / database / file (nothing for pool).

        Raises:
            ConfigurationError: the model is not offered here.
            StorageError: the database refused.
        """
        self.require(model)
        if model is StorageModel.POOL:
            return
        _check_tenant_id(tenant_id)
        with translate_errors():
            if model is StorageModel.BRIDGE:
                with self.owner.begin() as conn:
                    conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{tenant_id}"')
                migrate(self.owner, schema=tenant_id, app_role=self.app_role)
                return
            if self.postgres:
                db = database_name(self._silo_url(tenant_id, owner=True))
                statements = [f'CREATE DATABASE "{db}"']
                if self.app_role:
                    statements.append(f'GRANT CONNECT ON DATABASE "{db}" TO "{self.app_role}"')
                self._outside_transaction(statements)
                owner = make_engine(self._silo_url(tenant_id, owner=True), pool_size=1)
                try:
                    migrate(owner, app_role=self.app_role)
                finally:
                    dispose(owner)
                return
            path = self._silo_path(tenant_id)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # The one place the file is made (engines open it mode=rw): 0600 from the start,
            # a tenant's whole database is readable by the server only. An empty file is
            # an empty SQLite database.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            migrate(self._silo_engine(tenant_id))
            for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if p.exists():
                    p.chmod(0o600)

    def upgrade(self, tenant_id: str, model: StorageModel, head: str) -> bool:
        """Migrate the tenant's schema / database / file to ``head`` if it is behind
        (nothing for pool, which lives in the main database). Returns whether it migrated.

        Raises:
            StorageError: the database refused.
        """
        if model is StorageModel.POOL:
            return False
        _check_tenant_id(tenant_id)
        with translate_errors():
            if model is StorageModel.BRIDGE:
                if current_revision(self.owner, schema=tenant_id) == head:
                    return False
                migrate(self.owner, schema=tenant_id, app_role=self.app_role)
                return True
            if self.postgres:
                owner = make_engine(self._silo_url(tenant_id, owner=True), pool_size=1)
                try:
                    if current_revision(owner) == head:
                        return False
                    migrate(owner, app_role=self.app_role)
                    return True
                finally:
                    dispose(owner)
            if not self._silo_path(tenant_id).exists():
                return False  # not provisioned (yet): provision() migrates it
            engine = self._silo_engine(tenant_id)
            if current_revision(engine) == head:
                return False
            migrate(engine)
            return True

    def _outside_transaction(self, statements: list[str]) -> None:
        """Run statements as the owner with autocommit (CREATE/DROP DATABASE need it)."""
        admin = create_engine(normalise_url(self.owner_url), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                for sql in statements:
                    conn.exec_driver_sql(sql)
        finally:
            dispose(admin)

    def destroy(self, tenant_id: str, model: StorageModel) -> None:
        """Drop the tenant's schema / database / file (nothing for pool); idempotent."""
        if model is StorageModel.POOL:
            return
        _check_tenant_id(tenant_id)
        with translate_errors():
            if model is StorageModel.BRIDGE:
                with self.owner.begin() as conn:
                    conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{tenant_id}" CASCADE')
                return
            self._forget_silo(tenant_id)
            if self.postgres:
                db = database_name(self._silo_url(tenant_id, owner=True))
                if db is not None:
                    self._drop_silo_database(db)
                return
            path = self._silo_path(tenant_id)
            for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                p.unlink(missing_ok=True)

    def _drop_silo_database(self, db: str, *, wait_s: float = 10.0) -> None:
        """Drop a silo database that other processes of the deployment may still be using.

        Every other server and worker keeps pooled connections, as the application role, to
        each silo database it has used. ``WITH (FORCE)`` ends other sessions only when the
        dropping role may signal them, and the owner role may not signal the application
        role's. So: no new connections (``CONNECT`` revoked), the application role ends its
        own sessions there and they are waited for, then the owner drops the database (and
        ends its own sessions with it).
        """
        with self.owner.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": db}).first()
        if exists is None:
            return  # already dropped: destroy is idempotent
        revoke = [f'REVOKE CONNECT ON DATABASE "{db}" FROM PUBLIC']
        if self.app_role:
            revoke.append(f'REVOKE CONNECT ON DATABASE "{db}" FROM "{self.app_role}"')
        self._outside_transaction(revoke)
        others = (
            "FROM pg_stat_activity WHERE datname = :d AND usename = current_user AND pid <> pg_backend_pid()"
        )
        deadline = time.monotonic() + wait_s
        with self.main.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) {others}"), {"d": db})
            conn.rollback()
            while conn.execute(text(f"SELECT count(*) {others}"), {"d": db}).scalar_one():
                conn.rollback()  # a fresh snapshot of pg_stat_activity on the next read
                if time.monotonic() > deadline:
                    break  # the DROP below reports what is still connected
                time.sleep(0.05)
            conn.rollback()
        self._outside_transaction([f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'])

    def close(self) -> None:
        """Dispose every silo engine."""
        with self._lock:
            engines = [engine for engine, _ in self._silos.values()]
            self._silos.clear()
        for e in engines:
            dispose(e)


def _check_tenant_id(tenant_id: str) -> None:
    # Tenant ids name schemas, databases and files: only ids Patinox made are accepted.
    if not looks_like_id(tenant_id):
        raise ConfigurationError(f"not a tenant id: {tenant_id!r}", field="tenant_id")
