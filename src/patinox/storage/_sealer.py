"""Sealing of tenant payloads, and the one map of which columns are sealed.

A sealed payload is stored as the blob itself, in a binary column (format in
:mod:`patinox.storage._crypto.aead`: 33 bytes more than the UTF-8 plaintext). The AAD binds
each ciphertext to the tenant, the column and the row, so a ciphertext copied anywhere
else fails to decrypt.

:data:`SEALED_COLUMNS` is the single source of truth for which columns of which tables
hold sealed payloads, with the column naming the row in the AAD and the AAD's column
name. Everything that reads or writes those columns in bulk (key rotation, export and
import) walks this map through :func:`sealed_columns`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, NamedTuple

from patinox.errors import DecryptionFailed
from patinox.storage._crypto.aead import blob_key_version, decrypt_str, encrypt_str
from patinox.storage._crypto.keyring import TenantKeyring

__all__ = ["SEALED_COLUMNS", "SealedColumn", "Sealer", "sealed_columns"]


class SealedColumn(NamedTuple):
    """One sealed column of a tenant table.

    Attributes:
        table: the table's name (``runs``).
        key_column: the column whose value names the row in the AAD (``id``; ``key`` for
            agent memory).
        column: the sealed column (``input``).
        aad: the column's name in the AAD (``runs.input``).
    """

    table: str
    key_column: str
    column: str
    aad: str


#: Every sealed column, in the order key rotation re-seals them.
SEALED_COLUMNS: tuple[SealedColumn, ...] = (
    SealedColumn("memory", "key", "value", "memory.value"),
    SealedColumn("runs", "id", "input", "runs.input"),
    SealedColumn("runs", "id", "output", "runs.output"),
    SealedColumn("idempotency_keys", "key", "response", "idempotency_keys.response"),
    SealedColumn("threads", "id", "metadata", "threads.metadata"),
    SealedColumn("thread_messages", "id", "content", "thread_messages.content"),
    SealedColumn("webhook_endpoints", "id", "secret", "webhook_endpoints.secret"),
    SealedColumn("webhook_endpoints", "id", "previous_secret", "webhook_endpoints.previous_secret"),
    SealedColumn("secrets", "name", "value", "secrets.value"),
)


def sealed_columns(table: str | None = None) -> tuple[SealedColumn, ...]:
    """The sealed columns of ``table`` (by name; ``()`` for a table with none), or of every
    table when ``table`` is ``None``."""
    if table is None:
        return SEALED_COLUMNS
    return tuple(c for c in SEALED_COLUMNS if c.table == table)


class Sealer:
    """Encrypts and decrypts one tenant's payloads with its current DEK (AES-256-GCM).

    Bound to one tenant when made (by :class:`~patinox.storage.SqlBackend` for a store):
    it can neither seal for nor open another tenant's payloads.
    """

    __slots__ = ("keyring", "tenant_id")

    def __init__(self, keyring: TenantKeyring, tenant_id: str) -> None:
        self.keyring = keyring
        self.tenant_id = tenant_id

    def seal(self, table: str, record_id: str, text: str) -> bytes:
        """The blob of ``text`` for row ``record_id`` of the sealed column ``table`` (its
        AAD name, ``runs.input``), under the tenant's current DEK.

        Raises:
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
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

    def seal_row(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` of ``table`` (by name) with its sealed columns (:func:`sealed_columns`)
        sealed in place; a ``None`` or absent payload stays as it is. Returns ``row``.

        Raises:
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        for c in sealed_columns(table):
            if row.get(c.column) is not None:
                row[c.column] = self.seal(c.aad, str(row[c.key_column]), row[c.column])
        return row

    def open_row(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` of ``table`` (by name, as stored) with its sealed columns opened in
        place. Returns ``row``.

        Raises:
            DecryptionFailed: a payload is not a blob sealed for this row and column.
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        for c in sealed_columns(table):
            if c.column in row:
                row[c.column] = self.open(c.aad, str(row[c.key_column]), row[c.column])
        return row


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
