"""Payload encryption with a tenant's DEK: AES-256-GCM, AAD bound to tenant, table, row, version.

Blob format (all integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       4     DEK version (uint32, >= 1)
    5       12    nonce (random per blob)
    17      n+16  AES-256-GCM ciphertext of the n-byte plaintext, then the 16-byte tag

so a blob is 33 bytes longer than its plaintext. The AAD (authenticated, not stored) is::

    b"patinox-data" || format version (1 byte) || DEK version (uint32)
        || len(tenant_id) (uint32) || tenant_id (UTF-8)
        || len(table) (uint32) || table (UTF-8)
        || len(record_id) (uint32) || record_id (UTF-8)

Length prefixes keep ``("ab", "c")`` and ``("a", "bc")`` apart.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from patinox.errors import ConfigurationError
from patinox.storage._crypto.errors import DecryptionFailed

__all__ = [
    "BLOB_FORMAT_VERSION",
    "BLOB_OVERHEAD",
    "DEK_BYTES",
    "DataKey",
    "blob_key_version",
    "decrypt",
    "decrypt_str",
    "encrypt",
    "encrypt_str",
]

DEK_BYTES = 32
"""Length of a DEK in bytes (AES-256)."""

BLOB_FORMAT_VERSION = 1
_HEADER = struct.Struct(">BI")  # format version, DEK version
_NONCE_BYTES = 12
_TAG_BYTES = 16
_BODY_OFFSET = _HEADER.size + _NONCE_BYTES
BLOB_OVERHEAD = _BODY_OFFSET + _TAG_BYTES
"""Bytes a blob adds to its plaintext: 1 + 4 + 12 + 16 = 33."""

MAX_KEY_VERSION = 2**32 - 1
_AAD_LABEL = b"patinox-data"
_LEN = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class DataKey:
    """A tenant's decrypted DEK at one version.

    Attributes:
        tenant_id: the tenant the key belongs to.
        version: DEK version, 1 .. 2**32-1; recorded in every blob it seals.
        key: the 32 raw key bytes. Never logged: excluded from ``repr``.

    Raises:
        ConfigurationError: empty tenant id, version out of range, or a key that is not
            32 bytes.
    """

    tenant_id: str
    version: int
    key: bytes = field(repr=False)
    #: The AES-GCM cipher of ``key``, made once: what :func:`encrypt` and :func:`decrypt` use.
    cipher: AESGCM = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_tenant(self.tenant_id)
        _check_version(self.version)
        if not isinstance(self.key, bytes) or len(self.key) != DEK_BYTES:
            raise ConfigurationError(f"a DEK is {DEK_BYTES} bytes")
        object.__setattr__(self, "cipher", AESGCM(self.key))

    @classmethod
    def generate(cls, tenant_id: str, version: int) -> DataKey:
        """A fresh random DEK (from the OS CSPRNG) for ``tenant_id`` at ``version``."""
        return cls(tenant_id, version, AESGCM.generate_key(bit_length=8 * DEK_BYTES))


def encrypt(plaintext: bytes, *, key: DataKey, table: str, record_id: str) -> bytes:
    """Seal ``plaintext`` for one record of one tenant.

    Args:
        plaintext: the payload (any length up to GCM's limit of ~64 GiB).
        key: the tenant's current DEK; its tenant id and version go into the AAD.
        table: the table (or logical collection) the blob is stored in.
        record_id: the id of the row (or memory key) the blob belongs to.

    Returns:
        The blob, ``len(plaintext) + 33`` bytes (format in the module docstring). A
        fresh random 96-bit nonce is drawn per call, so sealing the same plaintext twice
        gives different blobs; rotate the DEK well before 2**32 blobs per DEK version.

    Raises:
        ConfigurationError: empty table or record id, or ``plaintext`` not bytes.
    """
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise ConfigurationError("encrypt() takes bytes; use encrypt_str() for text")
    _check_binding(key.tenant_id, table, record_id)
    header = _HEADER.pack(BLOB_FORMAT_VERSION, key.version)
    nonce = os.urandom(_NONCE_BYTES)
    aad = _aad(header, key.tenant_id, table, record_id)
    return header + nonce + key.cipher.encrypt(nonce, plaintext, aad)


def decrypt(
    blob: bytes,
    *,
    key_lookup: Callable[[int], DataKey],
    tenant_id: str,
    table: str,
    record_id: str,
) -> bytes:
    """Open a blob made by :func:`encrypt`, checking it belongs to this tenant, table and row.

    Args:
        blob: bytes as stored.
        key_lookup: returns the tenant's DEK for the version read from the blob, e.g.
            ``lambda v: keyring.key(tenant_id, v)``. Errors it raises (such as
            :class:`TenantKeysDestroyed`) propagate unchanged.
        tenant_id: the tenant the caller is acting for (not read from the blob).
        table: the table the blob was read from.
        record_id: the row the blob was read from.

    Returns:
        The plaintext bytes.

    Raises:
        DecryptionFailed: malformed or truncated blob, unknown format, a key for another
            tenant or version, or failed authentication (tampered bytes, or a blob
            copied from another tenant, table, row or key version).
        ConfigurationError: empty tenant id, table or record id.
    """
    _check_binding(tenant_id, table, record_id)
    where = {"tenant_id": tenant_id, "table": table, "record_id": record_id}
    if len(blob) < BLOB_OVERHEAD:
        raise DecryptionFailed("ciphertext is truncated", reason="malformed", **where)
    fmt, version = _HEADER.unpack_from(blob)
    if fmt != BLOB_FORMAT_VERSION:
        raise DecryptionFailed(f"unknown ciphertext format {fmt}", reason="unknown_format", **where)
    if version < 1:
        raise DecryptionFailed("ciphertext names no key version", reason="malformed", **where)
    key = key_lookup(version)
    if key.tenant_id != tenant_id or key.version != version:
        raise DecryptionFailed(
            "key lookup returned a key of another tenant or version", reason="key_mismatch", **where
        )
    header = bytes(blob[: _HEADER.size])
    aad = _aad(header, tenant_id, table, record_id)
    nonce = bytes(blob[_HEADER.size : _BODY_OFFSET])
    try:
        return key.cipher.decrypt(nonce, bytes(blob[_BODY_OFFSET:]), aad)
    except InvalidTag as exc:
        raise DecryptionFailed(
            "ciphertext failed authentication (altered, or not stored for this tenant/table/row)",
            reason="authentication_failed",
            key_version=version,
            **where,
        ) from exc


def blob_key_version(blob: bytes) -> int:
    """The DEK version a blob was sealed with, read from its header (not authenticated).

    For a background re-encryption job after :meth:`TenantKeyring.rotate_dek`: rows whose
    blob version is below the current one still need re-sealing.

    Raises:
        DecryptionFailed: too short to be a blob, or an unknown format version.
    """
    if len(blob) < BLOB_OVERHEAD or blob[0] != BLOB_FORMAT_VERSION:
        raise DecryptionFailed("not a ciphertext of a known format", reason="malformed")
    version: int = _HEADER.unpack_from(blob)[1]
    return version


def encrypt_str(text: str, *, key: DataKey, table: str, record_id: str) -> bytes:
    """:func:`encrypt` for text: UTF-8 encodes ``text`` and seals it. Same errors."""
    return encrypt(text.encode("utf-8"), key=key, table=table, record_id=record_id)


def decrypt_str(
    blob: bytes,
    *,
    key_lookup: Callable[[int], DataKey],
    tenant_id: str,
    table: str,
    record_id: str,
) -> str:
    """:func:`decrypt` for text sealed with :func:`encrypt_str`.

    Raises:
        DecryptionFailed: as :func:`decrypt`, or the plaintext is not UTF-8
            (``reason="not_utf8"``: it was sealed with :func:`encrypt`, not text).
    """
    data = decrypt(blob, key_lookup=key_lookup, tenant_id=tenant_id, table=table, record_id=record_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecryptionFailed(
            "plaintext is not UTF-8 text", reason="not_utf8", tenant_id=tenant_id, table=table,
            record_id=record_id,
        ) from exc  # fmt: skip


def _aad(header: bytes, tenant_id: str, table: str, record_id: str) -> bytes:
    parts = [_AAD_LABEL, header]
    for value in (tenant_id, table, record_id):
        raw = value.encode("utf-8")
        parts.append(_LEN.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _check_binding(tenant_id: str, table: str, record_id: str) -> None:
    _check_tenant(tenant_id)
    if not isinstance(table, str) or not table or not isinstance(record_id, str) or not record_id:
        raise ConfigurationError("table and record_id must be non-empty strings: the AAD binds both")


def _check_tenant(tenant_id: str) -> None:
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ConfigurationError("a tenant id is required (non-empty string)")


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_KEY_VERSION:
        raise ConfigurationError(f"key versions are integers in 1..{MAX_KEY_VERSION}")
