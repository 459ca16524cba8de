"""The SQL :class:`~patinox.storage.crypto.DekStore`: wrapped DEKs in ``tenant_keys``.

Always in the deployment's shared database (control plane), whatever the tenant's storage
model. The primary key ``(tenant_id, version)`` makes the first DEK of a tenant unique
under any concurrency: the loser of a race gets ``False`` and re-reads the winner's key.
A tenant whose ``keys_destroyed_at`` is set never gets a DEK again.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy import Connection, delete, insert, select, update

from patinox.errors import AlreadyExists
from patinox.storage import _schema as s
from patinox.storage._schema import utcnow


class SqlDekStore:
    """Wrapped DEKs of every tenant, through the control plane's transactions.

    Args:
        transaction: opens one control-plane transaction (``SqlBackend.transaction``).
    """

    def __init__(self, transaction: Callable[[], AbstractContextManager[Connection]]) -> None:
        self._transaction = transaction

    def get_wrapped(self, tenant_id: str, version: int | None = None) -> tuple[int, bytes] | None:
        """(version, wrapped) of ``version``, or of the newest when ``version`` is None."""
        k = s.tenant_keys
        q = select(k.c.version, k.c.wrapped).where(k.c.tenant_id == tenant_id)
        q = q.order_by(k.c.version.desc()).limit(1) if version is None else q.where(k.c.version == version)
        with self._transaction() as conn:
            row = conn.execute(q).first()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def list_wrapped(self, tenant_id: str) -> list[tuple[int, bytes]]:
        """Every (version, wrapped) of the tenant, oldest first."""
        k = s.tenant_keys
        q = select(k.c.version, k.c.wrapped).where(k.c.tenant_id == tenant_id).order_by(k.c.version)
        with self._transaction() as conn:
            return [(int(v), bytes(w)) for v, w in conn.execute(q)]

    def insert_wrapped_if_absent(self, tenant_id: str, version: int, wrapped: bytes) -> bool:
        """Insert a DEK row; False when that version exists or the tenant was shredded."""
        try:
            with self._transaction() as conn:
                if self._destroyed(conn, tenant_id):
                    return False
                conn.execute(
                    insert(s.tenant_keys).values(
                        tenant_id=tenant_id, version=version, wrapped=wrapped, created_at=utcnow()
                    )
                )
        except AlreadyExists:
            return False
        return True

    def replace_wrapped(self, tenant_id: str, version: int, wrapped: bytes) -> bool:
        """Re-wrap an existing DEK row (KEK rotation); never creates one."""
        k = s.tenant_keys
        with self._transaction() as conn:
            n = conn.execute(
                update(k).where(k.c.tenant_id == tenant_id, k.c.version == version).values(wrapped=wrapped)
            ).rowcount
        return bool(n)

    def destroy(self, tenant_id: str) -> None:
        """Delete every DEK of the tenant and mark it shredded, in one transaction."""
        with self._transaction() as conn:
            conn.execute(delete(s.tenant_keys).where(s.tenant_keys.c.tenant_id == tenant_id))
            conn.execute(
                update(s.tenants)
                .where(s.tenants.c.id == tenant_id, s.tenants.c.keys_destroyed_at.is_(None))
                .values(keys_destroyed_at=utcnow())
            )

    def is_destroyed(self, tenant_id: str) -> bool:
        """True once the tenant's keys were destroyed."""
        with self._transaction() as conn:
            return self._destroyed(conn, tenant_id)

    @staticmethod
    def _destroyed(conn: object, tenant_id: str) -> bool:
        q = select(s.tenants.c.keys_destroyed_at).where(s.tenants.c.id == tenant_id)
        return conn.execute(q).scalar() is not None  # type: ignore[attr-defined]
