"""One tenant's secrets: :class:`TenantSecrets`.

A secret is a named value a tenant gives the runtime to use on its behalf on the host
side: its own model-provider key (BYOK, :data:`PROVIDER_KEY_PREFIX`), a token a tool adds
to its requests, a TLS private key. The value is sealed under the tenant's DEK like run
payloads (AAD: ``secrets.value`` and the secret's name), so crypto-shredding the tenant
makes it unreadable and deleting the tenant purges it with its other rows.

Writes and uses are audited in the same transaction as the row they concern (``secret.set``,
``secret.rotate``, ``secret.delete``, ``secret.use``); an audit record names the secret and
its version, never its value. Nothing here returns a value but :meth:`TenantSecrets.value`,
which only host-side code calls (the API has no route that reads one).

Made by :meth:`TenantStore.secrets <patinox.storage.TenantStore.secrets>`, bound to the
store's tenant and placement: every statement carries its ``tenant_id``.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, delete, insert, select, update

from patinox.errors import AlreadyExists, InvalidRequest, NotFound
from patinox.storage import _schema as s
from patinox.storage._schema import utcnow
from patinox.storage._sealer import Sealer
from patinox.storage._statements import INSERT_AUDIT, audit_values

__all__ = ["MAX_SECRET_BYTES", "PROVIDER_KEY_PREFIX", "SecretInfo", "TenantSecrets", "check_secret_name"]

#: Largest secret value, bytes of UTF-8 (64 KiB: a TLS certificate chain fits).
MAX_SECRET_BYTES: Final = 64 * 1024
#: The name of a tenant's own provider key is this prefix and the provider family
#: (``provider:openai``, ``provider:anthropic``): its runs on that provider use it (BYOK).
PROVIDER_KEY_PREFIX: Final = "provider:"
#: A secret's name: 1-100 letters, digits and ``_ . : -``, starting with a letter or digit.
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
_AAD: Final = "secrets.value"
_T = s.secrets


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretInfo:
    """What may be said of a secret: never its value.

    Attributes:
        name: the secret's name.
        version: 1 when first set, one more on each rotation.
        created_at: when it was first set (UTC).
        updated_at: when its value was last set (UTC).
    """

    name: str
    version: int
    created_at: datetime
    updated_at: datetime


def check_secret_name(name: str) -> None:
    """Refuse a name that is not 1-100 letters, digits and ``_ . : -`` starting with a
    letter or digit.

    Raises:
        InvalidRequest: the name is malformed (``field="name"``; the name itself is not
            repeated, it may be a pasted value).
    """
    if not _NAME.fullmatch(name):
        raise InvalidRequest(
            "a secret's name is 1-100 letters, digits and _ . : - starting with a letter or digit",
            field="name",
        )


class TenantSecrets:
    """One tenant's secrets (see the module docstring)."""

    __slots__ = ("_sealer", "_tx", "tenant_id")

    def __init__(self, tx: Callable[[], AbstractContextManager[Connection]], sealer: Sealer) -> None:
        self._tx = tx
        self._sealer = sealer
        self.tenant_id = sealer.tenant_id

    def put(self, name: str, value: str, *, actor: str) -> tuple[SecretInfo, bool]:
        """Set ``name`` to ``value``, or rotate it to a new value when it exists; audited
        (``secret.set`` or ``secret.rotate``, target the name, detail the version) in the
        same transaction.

        Args:
            name: see :func:`check_secret_name`.
            value: 1 to :data:`MAX_SECRET_BYTES` bytes of UTF-8 text without NUL.
            actor: who sets it (a key id, ``operator``...), for the audit record.

        Returns:
            The secret's description and whether it existed before (a rotation).

        Raises:
            InvalidRequest: a malformed name, or an empty, over-long or NUL-holding value
                (the message never quotes the value).
            TenantKeysDestroyed: the tenant was crypto-shredded.
            StorageError: the database failed.
        """
        check_secret_name(name)
        size = len(value.encode("utf-8"))
        if not 1 <= size <= MAX_SECRET_BYTES:
            raise InvalidRequest(f"a secret's value is 1-{MAX_SECRET_BYTES} bytes", field="value")
        if "\x00" in value:
            raise InvalidRequest("a secret's value cannot hold NUL characters", field="value")
        sealed = self._sealer.seal(_AAD, name, value)
        for _ in range(3):  # first writers at once: one inserts, the others rotate
            now = utcnow()
            try:
                with self._tx() as conn:
                    # One statement bumps the version, so concurrent rotations never lose one.
                    old = conn.execute(
                        update(_T)
                        .where(*self._mine(name))
                        .values(value=sealed, version=_T.c.version + 1, updated_at=now)
                        .returning(_T.c.version, _T.c.created_at)
                    ).first()
                    if old is None:
                        version, created = 1, now
                        conn.execute(
                            insert(_T).values(
                                tenant_id=self.tenant_id,
                                name=name,
                                value=sealed,
                                version=1,
                                created_at=now,
                                updated_at=now,
                            )
                        )
                    else:
                        version, created = int(old.version), old.created_at
                    action = "secret.set" if old is None else "secret.rotate"
                    self._audit(conn, actor, action, name, {"version": version})
                return SecretInfo(
                    name=name, version=version, created_at=created, updated_at=now
                ), old is not None
            except AlreadyExists:
                continue
        raise AlreadyExists(f"secret {name!r} is being set concurrently; retry", name=name)

    def list(self) -> list[SecretInfo]:
        """The tenant's secrets by name, without their values.

        Raises:
            StorageError: the database failed.
        """
        q = (
            select(_T.c.name, _T.c.version, _T.c.created_at, _T.c.updated_at)
            .where(_T.c.tenant_id == self.tenant_id)
            .order_by(_T.c.name)
        )
        with self._tx() as conn:
            return [SecretInfo(**row) for row in conn.execute(q).mappings()]

    def exists(self, name: str) -> bool:
        """Whether the tenant has a secret called ``name`` (one read by primary key; no audit).

        Raises:
            StorageError: the database failed.
        """
        with self._tx() as conn:
            return conn.execute(select(_T.c.version).where(*self._mine(name))).first() is not None

    def value(self, name: str, *, actor: str, purpose: str) -> str:
        """The value of ``name``, for host-side use only (a provider call, a header the
        egress tool adds, a TLS handshake); audited as ``secret.use`` with ``purpose``
        (e.g. ``model:openai:gpt-4o``) and the version, in the same transaction.

        Raises:
            NotFound: the tenant has no such secret.
            TenantKeysDestroyed: the tenant was crypto-shredded.
            DecryptionFailed: the stored value is not sealed for this tenant and name.
            StorageError: the database failed.
        """
        with self._tx() as conn:
            row = conn.execute(select(_T.c.value, _T.c.version).where(*self._mine(name))).first()
            if row is None:
                raise NotFound(f"secret {name!r} not found")
            self._audit(conn, actor, "secret.use", name, {"version": int(row.version), "purpose": purpose})
        opened = self._sealer.open(_AAD, name, row.value)
        assert opened is not None  # the column is NOT NULL
        return opened

    def delete(self, name: str, *, actor: str) -> None:
        """Remove ``name``; audited (``secret.delete``) in the same transaction.

        Raises:
            NotFound: the tenant has no such secret.
            StorageError: the database failed.
        """
        with self._tx() as conn:
            if conn.execute(delete(_T).where(*self._mine(name))).rowcount != 1:
                raise NotFound(f"secret {name!r} not found")
            self._audit(conn, actor, "secret.delete", name, {})

    def _mine(self, name: str) -> builtins.list[Any]:
        return [_T.c.tenant_id == self.tenant_id, _T.c.name == name]

    def _audit(self, conn: Connection, actor: str, action: str, name: str, detail: dict[str, Any]) -> None:
        conn.execute(INSERT_AUDIT, audit_values(self.tenant_id, actor, action, name, "ok", detail))
