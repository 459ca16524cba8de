"""The host names tenants are reached at (``tenant_hosts``), and the quarantine of names a
tenant no longer holds.

A name is **held** by a tenant while its row has no ``released_at`` and its owner is not
deleted; it is **quarantined** until ``quarantine`` after it was released (the operator took
it away, or the owner was deleted: the owner's ``deleted_at``); then another tenant may
claim it. The tenant that held a name may claim it back at any time. Names are compared as
given: callers normalise them (IDNA, lower case) first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from patinox.errors import AlreadyExists
from patinox.storage import _schema as s
from patinox.storage._control_store import SqlBackend

__all__ = ["HostClaim", "TenantHosts"]


@dataclass(frozen=True, kw_only=True)
class HostClaim:
    """One host name held by a tenant: ``name`` (a slug's bare label, or a full domain),
    ``kind`` (``slug`` or ``domain``), since ``created_at``."""

    name: str
    kind: str
    created_at: datetime


class TenantHosts:
    """Reads and claims of ``tenant_hosts`` on the control plane's database.

    Args:
        backend: the control-plane store.
    """

    def __init__(self, backend: SqlBackend) -> None:
        self._backend = backend

    def owner_of(self, name: str, kind: str) -> str | None:
        """The id of the live tenant holding ``name`` as ``kind``, or ``None`` (nobody, a
        released name, or a deleted owner)."""
        h, t = s.tenant_hosts, s.tenants
        with self._backend.transaction() as conn:
            row = conn.execute(
                select(h.c.owner_id)
                .join(t, t.c.id == h.c.owner_id)
                .where(h.c.name == name, h.c.kind == kind, h.c.released_at.is_(None), t.c.state != "deleted")
            ).first()
        return None if row is None else str(row[0])

    def held_by(self, tenant_id: str) -> list[HostClaim]:
        """The names ``tenant_id`` holds, slug first, then domains by name."""
        h = s.tenant_hosts
        with self._backend.transaction() as conn:
            rows = conn.execute(
                select(h.c.name, h.c.kind, h.c.created_at)
                .where(h.c.owner_id == tenant_id, h.c.released_at.is_(None))
                .order_by(h.c.kind.desc(), h.c.name)
            ).all()
        return [HostClaim(name=r.name, kind=r.kind, created_at=r.created_at) for r in rows]

    def replace(
        self, tenant_id: str, names: Mapping[str, Iterable[str]], *, now: datetime, quarantine: timedelta
    ) -> None:
        """Make ``names[kind]`` the names of each ``kind`` ``tenant_id`` holds, in one
        transaction: each new one claimed, each one of that kind it held and is not listed
        released (quarantined from ``now``).

        Raises:
            AlreadyExists: a name is held by another tenant, or still quarantined after
                another tenant released it (fields ``host``, ``held_until`` when
                quarantined); nothing was changed.
            StorageError: the database failed; nothing was changed.
        """
        h = s.tenant_hosts
        with self._backend.transaction() as conn:
            for kind, listed in names.items():
                wanted = list(dict.fromkeys(listed))
                for name in wanted:
                    self._claim(conn, tenant_id, kind, name, now=now, quarantine=quarantine)
                held = conn.execute(
                    select(h.c.name).where(
                        h.c.owner_id == tenant_id, h.c.kind == kind, h.c.released_at.is_(None)
                    )
                ).scalars()
                gone = [n for n in held if n not in wanted]
                if gone:
                    conn.execute(
                        update(h).where(h.c.name.in_(gone), h.c.owner_id == tenant_id).values(released_at=now)
                    )

    @staticmethod
    def _claim(
        conn: Connection, tenant_id: str, kind: str, name: str, *, now: datetime, quarantine: timedelta
    ) -> None:
        h, t = s.tenant_hosts, s.tenants
        row = (
            conn.execute(
                select(h.c.owner_id, h.c.kind, h.c.released_at, t.c.deleted_at, t.c.state)
                .join(t, t.c.id == h.c.owner_id, isouter=True)
                .where(h.c.name == name)
            )
            .mappings()
            .first()
        )
        if row is not None:
            if row["owner_id"] == tenant_id and row["released_at"] is None and row["kind"] == kind:
                return  # already held
            if row["owner_id"] != tenant_id:
                released: Any = row["released_at"]
                if released is None and row["state"] == "deleted":
                    released = row["deleted_at"]
                if released is None:
                    raise AlreadyExists(f"the host name {name!r} belongs to another tenant", host=name)
                if released + quarantine > now:
                    until = released + quarantine
                    raise AlreadyExists(
                        f"the host name {name!r} was another tenant's; it is held back until "
                        f"{until.isoformat()}",
                        host=name,
                        held_until=until.isoformat(),
                    )
            conn.execute(delete(h).where(h.c.name == name))
        conn.execute(
            insert(h).values(name=name, owner_id=tenant_id, kind=kind, created_at=now, released_at=None)
        )
