"""Key providers: who holds the KEK and wraps/unwraps tenant DEKs with it.

Wrapped-key format (:meth:`WrappedKey.to_bytes`, integers big-endian)::

    offset  size  field
    0       1     format version: 0x01 wrapped by the KEK alone,
                                  0x02 wrapped by a key that also needs the tenant's key share
    1       4     KEK version (uint32, >= 1)
    5       1     nonce length N (0..255; 12 for the AES-GCM providers here, 0 for a KMS
                  whose ciphertext carries its own)
    6       N     nonce
    6+N     rest  wrapped DEK (for AES-GCM: 32-byte DEK ciphertext + 16-byte tag)

Both formats have the same layout; a DEK wrapped by :class:`FileKeyProvider` or
:class:`EnvKeyProvider` is 66 bytes. The wrapping AAD is ``b"patinox-dek|" + tenant_id
(UTF-8) + b"|" + str(kek_version)`` (:func:`dek_wrap_aad`); the version is digits and
comes last, so the split is unambiguous, and a wrapped DEK moved to another tenant's row
fails to unwrap.

* Format 1 (``WrappedKey.tenant_share=False``): the AES-256-GCM key is the KEK itself.
  :class:`EnvKeyProvider` writes it; every provider here still reads it (DEKs wrapped
  before key shares existed). :meth:`TenantKeyring.rewrap_all` upgrades them to format 2
  when the provider has shares.
* Format 2 (``tenant_share=True``): the key is
  ``HKDF-SHA256(ikm=KEK, salt=tenant share, info=b"patinox-tenant-kek|" + tenant_id +
  b"|" + str(kek_version))`` (:func:`~patinox.storage._crypto.shares.tenant_wrapping_key`).
  :class:`FileKeyProvider` writes it. The 32-byte share lives outside the database
  (:mod:`patinox.storage._crypto.shares`) and is destroyed by
  :meth:`TenantShredding.destroy_tenant`, after which no copy of the wrapped DEK opens.
  Changing the format byte of a stored key to 1 does not help an attacker: the KEK
  alone does not open a format-2 ciphertext.

Key file format (JSON, mode 0600)::

    {"format": "patinox-kek", "format_version": 1, "current": 2,
     "keys": {"1": "<base64 of 32 bytes>", "2": "<base64 of 32 bytes>"}}
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from patinox.errors import ConfigurationError
from patinox.storage._crypto.aead import DEK_BYTES, MAX_KEY_VERSION
from patinox.storage._crypto.errors import DecryptionFailed, TenantKeysDestroyed
from patinox.storage._crypto.fileutil import fsync_dir, write_private_temp
from patinox.storage._crypto.shares import TenantShares, tenant_wrapping_key

__all__ = [
    "WRAPPED_FORMAT_KEK_ONLY",
    "WRAPPED_FORMAT_TENANT_SHARE",
    "EnvKeyProvider",
    "FileKeyProvider",
    "KeyProvider",
    "TenantShredding",
    "WrappedKey",
    "dek_wrap_aad",
    "key_provider_from_url",
]

WRAPPED_FORMAT_KEK_ONLY = 1
"""Wrapped-key format 1: wrapped by the KEK alone."""
WRAPPED_FORMAT_TENANT_SHARE = 2
"""Wrapped-key format 2: wrapped by a key derived from the KEK and the tenant's key share."""
_WK_HEADER = struct.Struct(">BIB")  # format version, KEK version, nonce length
_KEK_BYTES = 32
_NONCE_BYTES = 12
_FILE_FORMAT = "patinox-kek"
_FILE_FORMAT_VERSION = 1
#: Matched whole (``fullmatch``; ``$`` would also match before a final newline).
_ENV_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A DEK encrypted under one KEK version; the only form in which a DEK is stored.

    Attributes:
        kek_version: version of the KEK that wrapped it, 1 .. 2**32-1.
        nonce: the wrapping nonce, 0..255 bytes (empty when the KMS ciphertext carries its own).
        ciphertext: the wrapped DEK, tag included.
        tenant_share: True when unwrapping also needs per-tenant key material kept outside
            the database (the tenant's key share, or a per-tenant KMS key): stored as
            format 2. False (the default, format 1): the KEK alone unwraps it.

    Raises:
        ConfigurationError: a field out of range.
    """

    kek_version: int
    nonce: bytes
    ciphertext: bytes = field(repr=False)
    tenant_share: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.kek_version, bool) or not 1 <= self.kek_version <= MAX_KEY_VERSION:
            raise ConfigurationError(f"KEK versions are integers in 1..{MAX_KEY_VERSION}")
        if len(self.nonce) > 255:
            raise ConfigurationError("a wrapping nonce is at most 255 bytes")
        if not self.ciphertext:
            raise ConfigurationError("a wrapped key has a ciphertext")

    @property
    def format_version(self) -> int:
        """1 (KEK alone) or 2 (KEK and tenant share); the first byte of :meth:`to_bytes`."""
        return WRAPPED_FORMAT_TENANT_SHARE if self.tenant_share else WRAPPED_FORMAT_KEK_ONLY

    def to_bytes(self) -> bytes:
        """The stored form (format in the module docstring); 66 bytes for the AES-GCM providers."""
        header = _WK_HEADER.pack(self.format_version, self.kek_version, len(self.nonce))
        return header + self.nonce + self.ciphertext

    @classmethod
    def from_bytes(cls, data: bytes) -> WrappedKey:
        """Parse :meth:`to_bytes` output, of format 1 or 2.

        Raises:
            DecryptionFailed: truncated or malformed bytes, or an unknown format version
                (``reason="malformed_wrapped_key"``).
        """
        try:
            fmt, version, nonce_len = _WK_HEADER.unpack_from(data)
            start = _WK_HEADER.size + nonce_len
            if fmt not in (WRAPPED_FORMAT_KEK_ONLY, WRAPPED_FORMAT_TENANT_SHARE) or len(data) <= start:
                raise ValueError("bad format version or length")
            return cls(
                version,
                bytes(data[_WK_HEADER.size : start]),
                bytes(data[start:]),
                tenant_share=fmt == WRAPPED_FORMAT_TENANT_SHARE,
            )
        except (struct.error, ValueError, ConfigurationError) as exc:
            raise DecryptionFailed("wrapped key is malformed", reason="malformed_wrapped_key") from exc


def dek_wrap_aad(tenant_id: str, kek_version: int) -> bytes:
    """The AAD (or KMS encryption context, as bytes) that binds a wrapped DEK to its tenant."""
    return b"patinox-dek|" + tenant_id.encode("utf-8") + b"|" + str(kek_version).encode("ascii")


class KeyProvider(Protocol):
    """Holds the KEK(s) and wraps/unwraps DEKs. Implementations must be thread-safe.

    A cloud KMS plugs in by implementing these three methods (see
    :mod:`patinox.storage.crypto`). A provider that can also destroy a tenant's key
    material outside the database implements :class:`TenantShredding` as well.
    """

    def kek_version(self) -> int:
        """The KEK version :meth:`wrap` uses now (>= 1)."""
        ...

    def wrap(self, dek: bytes, *, tenant_id: str) -> WrappedKey:
        """Encrypt ``dek`` under the current KEK, bound to ``tenant_id``.

        Raises:
            ConfigurationError: ``dek`` is not 32 bytes, or the KEK is unavailable.
            TenantKeysDestroyed: (providers with :class:`TenantShredding`) the tenant's
                key material was destroyed.
        """
        ...

    def unwrap(self, wrapped: WrappedKey, *, tenant_id: str) -> bytes:
        """Decrypt a wrapped DEK, checking it was wrapped for ``tenant_id``.

        Returns:
            The 32 DEK bytes.

        Raises:
            DecryptionFailed: wrapped for another tenant, altered, or under a KEK version
                this provider does not hold.
            TenantKeysDestroyed: (providers with :class:`TenantShredding`) the tenant's
                key material was destroyed.
        """
        ...


@runtime_checkable
class TenantShredding(Protocol):
    """Optional capability of a :class:`KeyProvider`: per-tenant key material outside the database.

    A provider with it wraps each tenant's DEKs with a key that needs something of that
    tenant which never enters the database (:class:`FileKeyProvider`: a key share file;
    a KMS: one KMS key per tenant). Destroying it makes every copy of the tenant's
    wrapped DEKs useless, database backups taken earlier included.
    :meth:`TenantKeyring.shred` calls :meth:`destroy_tenant` first when the provider has
    it (``isinstance(provider, TenantShredding)``); otherwise shredding only deletes the
    rows of the live database.
    """

    def destroy_tenant(self, tenant_id: str) -> None:
        """Destroy the tenant's key material; from then on :meth:`KeyProvider.unwrap` and
        :meth:`KeyProvider.wrap` raise :class:`TenantKeysDestroyed` for it. Idempotent."""
        ...

    def tenant_destroyed(self, tenant_id: str) -> bool:
        """True once :meth:`destroy_tenant` ran for the tenant."""
        ...


def _check_wrap_args(dek: bytes, tenant_id: str) -> None:
    if not isinstance(dek, bytes) or len(dek) != DEK_BYTES:
        raise ConfigurationError(f"a DEK is {DEK_BYTES} bytes")
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ConfigurationError("a tenant id is required to wrap a DEK")


def _gcm_wrap(
    aead: AESGCM, kek_version: int, dek: bytes, tenant_id: str, *, tenant_share: bool = False
) -> WrappedKey:
    _check_wrap_args(dek, tenant_id)
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = aead.encrypt(nonce, dek, dek_wrap_aad(tenant_id, kek_version))
    return WrappedKey(kek_version, nonce, ciphertext, tenant_share=tenant_share)


def _gcm_unwrap(aead: AESGCM, wrapped: WrappedKey, tenant_id: str) -> bytes:
    try:
        return aead.decrypt(wrapped.nonce, wrapped.ciphertext, dek_wrap_aad(tenant_id, wrapped.kek_version))
    except (InvalidTag, ValueError) as exc:  # ValueError: a nonce of the wrong length
        raise DecryptionFailed(
            "wrapped DEK failed authentication (altered, or not wrapped for this tenant)",
            reason="dek_unwrap_failed",
            tenant_id=tenant_id,
            kek_version=wrapped.kek_version,
        ) from exc


def _destroyed_error(tenant_id: str) -> TenantKeysDestroyed:
    return TenantKeysDestroyed(
        f"the keys of tenant {tenant_id} were destroyed; its data cannot be decrypted",
        tenant_id=tenant_id,
    )


# --- key file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _KekSet:
    current: int
    raw: Mapping[int, bytes] = field(repr=False)
    aeads: Mapping[int, AESGCM] = field(repr=False)
    signature: tuple[int, ...]


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _check_private(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigurationError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refusing to use it. Run `chmod 600 {path}` (on Kubernetes, mount the secret with "
            "defaultMode: 0400)."
        )


def _load_kek_file(path: Path) -> _KekSet:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigurationError(
            f"no key file at {path}; create one with `patinox init` (FileKeyProvider.create)"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot open key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # check the file we read, not whatever the path names later
        _check_private(path, st)
        data = f.read()
    try:
        doc: Any = json.loads(data)
        if doc.get("format") != _FILE_FORMAT or doc.get("format_version") != _FILE_FORMAT_VERSION:
            raise ValueError("not a patinox key file of a known format version")
        raw = {int(v): base64.b64decode(k, validate=True) for v, k in doc["keys"].items()}
        current = int(doc["current"])
        if current not in raw or any(len(k) != _KEK_BYTES or v < 1 for v, k in raw.items()):
            raise ValueError("keys must be 32 bytes with versions >= 1, current among them")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise ConfigurationError(f"key file {path} is malformed: {exc}") from exc
    aeads = {v: AESGCM(k) for v, k in raw.items()}
    return _KekSet(current, raw, aeads, _signature(st))


def _encode_kek_file(current: int, raw: Mapping[int, bytes]) -> bytes:
    doc = {
        "format": _FILE_FORMAT,
        "format_version": _FILE_FORMAT_VERSION,
        "current": current,
        "keys": {str(v): base64.b64encode(k).decode("ascii") for v, k in sorted(raw.items())},
    }
    return (json.dumps(doc, indent=1) + "\n").encode("ascii")


@contextmanager
def _exclusive_file_lock(path: Path) -> Iterator[None]:
    """Serialise key-file rewrites across processes (a ``.lock`` file beside the key file)."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class FileKeyProvider:
    """KEKs in a local JSON file of mode 0600, with versions for rotation, and a key share
    per tenant in a directory beside it; implements :class:`TenantShredding`.

    The embedded default (``patinox init`` creates the file). Several processes may share
    one file: :meth:`rotate` takes an exclusive lock and replaces the file atomically, and
    the others pick the new version up on their next :meth:`wrap` / :meth:`kek_version`
    (the file is ``stat``-ed, and re-read when it changed) or when asked to unwrap under
    a version they do not hold yet.

    Tenant key shares: the first :meth:`wrap` for a tenant creates its 32-byte random
    share in ``shares_dir`` (default ``<key file>.tenants/``, mode 0700; each share mode
    0600; layout in :mod:`patinox.storage._crypto.shares`), atomically, so concurrent first
    writers in any processes end with one share. DEKs are then wrapped in format 2 by
    ``HKDF-SHA256(KEK, salt=share, info=tenant id and KEK version)``. :meth:`destroy_tenant`
    writes a tombstone, then overwrites and unlinks the share: every copy of the tenant's
    wrapped DEKs, in the database or any backup of it, is then useless, and this provider
    refuses the tenant (:class:`TenantKeysDestroyed`) for wrap and unwrap, format 1
    included. Every process of a deployment must see the same share directory (one host,
    or a shared file system), exactly as it must see the same key file. Shares are cached
    in memory per tenant for at most ``share_ttl_s`` seconds; the tombstone is checked on
    every wrap and unwrap (one ``stat``), so a destroyed tenant is refused at once in every
    process. Keep backups of the share directory no longer than the deletion retention
    you promise (see :mod:`patinox.storage.crypto`).

    Args:
        path: the key file.
        shares_dir: the share directory; default ``<path>.tenants`` (``path`` with
            ``.tenants`` appended to its name). Must be writable (not a read-only
            secret mount).
        share_ttl_s: lifetime of a cached share, seconds (> 0).
        clock: monotonic seconds for the share cache; injectable for tests.

    Raises:
        ConfigurationError: the file is missing, malformed, or accessible by group or
            others (the message says to run ``chmod 600 PATH``); ``share_ttl_s`` <= 0.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shares_dir: str | os.PathLike[str] | None = None,
        share_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._keks = _load_kek_file(self._path)
        default = self._path.with_name(self._path.name + ".tenants")
        where = Path(shares_dir) if shares_dir is not None else default
        self._shares = TenantShares(where, ttl_s=share_ttl_s, clock=clock)

    def __repr__(self) -> str:
        return f"FileKeyProvider({str(self._path)!r}, kek_version={self._keks.current})"

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        shares_dir: str | os.PathLike[str] | None = None,
        share_ttl_s: float = 300.0,
    ) -> FileKeyProvider:
        """Create a new key file holding a random KEK version 1, mode 0600, and open it.

        The file is written to a temporary name, synced, then hard-linked into place, so
        an existing key file is never overwritten and a crash leaves no half-written one.
        Missing parent folders are created with mode 0700.

        Raises:
            ConfigurationError: a file already exists at ``path``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = write_private_temp(path, _encode_kek_file(1, {1: AESGCM.generate_key(bit_length=256)}))
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigurationError(f"key file {path} already exists; refusing to overwrite it") from None
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return cls(path, shares_dir=shares_dir, share_ttl_s=share_ttl_s)

    @property
    def path(self) -> Path:
        """The key file."""
        return self._path

    @property
    def shares_dir(self) -> Path:
        """The directory of the tenants' key shares."""
        return self._shares.directory

    @property
    def shares(self) -> TenantShares:
        """The tenants' key shares (directory and in-memory cache)."""
        return self._shares

    def versions(self) -> tuple[int, ...]:
        """Every KEK version the file holds, ascending."""
        return tuple(sorted(self._refresh().raw))

    def kek_version(self) -> int:
        """The current KEK version, re-reading the file if another process rotated it."""
        return self._refresh().current

    def rotate(self) -> int:
        """Add a new random KEK version and make it current; older versions stay for unwrapping.

        Existing wrapped DEKs keep working; run :meth:`TenantKeyring.rewrap_all` to move
        them to the new version.

        Returns:
            The new KEK version.

        Raises:
            ConfigurationError: the file became unreadable or insecure meanwhile.
        """
        with self._lock, _exclusive_file_lock(self._path):
            keks = _load_kek_file(self._path)  # the file, not our copy: another process may have rotated
            new = max(keks.raw) + 1
            raw = {**keks.raw, new: AESGCM.generate_key(bit_length=256)}
            tmp = write_private_temp(self._path, _encode_kek_file(new, raw))
            os.replace(tmp, self._path)
            fsync_dir(self._path.parent)
            self._keks = _load_kek_file(self._path)
            return new

    def wrap(self, dek: bytes, *, tenant_id: str) -> WrappedKey:
        """Wrap ``dek`` for ``tenant_id`` (format 2: AES-256-GCM, 12-byte nonce, under the key
        derived from the current KEK and the tenant's share, which is created if missing).

        Raises:
            ConfigurationError: ``dek`` is not 32 bytes, or the key file or share
                directory is gone, insecure or not writable.
            TenantKeysDestroyed: :meth:`destroy_tenant` ran for the tenant.
        """
        _check_wrap_args(dek, tenant_id)
        keks = self._refresh()
        share = self._shares.get_or_create(tenant_id)
        aead = AESGCM(tenant_wrapping_key(keks.raw[keks.current], share, tenant_id, keks.current))
        return _gcm_wrap(aead, keks.current, dek, tenant_id, tenant_share=True)

    def unwrap(self, wrapped: WrappedKey, *, tenant_id: str) -> bytes:
        """Unwrap a DEK wrapped for ``tenant_id`` by any KEK version this file holds, in
        format 2 (with the tenant's share) or format 1 (KEK alone, written before shares).

        Raises:
            TenantKeysDestroyed: :meth:`destroy_tenant` ran for the tenant (whatever the
                format: a format-1 DEK restored from an old backup is refused too).
            DecryptionFailed: wrapped for another tenant or altered
                (``reason="dek_unwrap_failed"``), a KEK version not in the file
                (``reason="unknown_kek_version"``: an old or wrong key file), or a
                format-2 DEK whose share is not in the share directory
                (``reason="tenant_share_missing"``).
        """
        if self._shares.destroyed(tenant_id):
            raise _destroyed_error(tenant_id)
        keks = self._keks
        if wrapped.kek_version not in keks.aeads:
            keks = self._refresh()
        aead = keks.aeads.get(wrapped.kek_version)
        if aead is None:
            raise DecryptionFailed(
                f"KEK version {wrapped.kek_version} is not in key file {self._path} "
                f"(it holds {sorted(keks.raw)}); was the file replaced by an older copy?",
                reason="unknown_kek_version",
                tenant_id=tenant_id,
                kek_version=wrapped.kek_version,
            )
        if not wrapped.tenant_share:
            return _gcm_unwrap(aead, wrapped, tenant_id)
        share = self._shares.get(tenant_id)
        if share is None:
            if self._shares.destroyed(tenant_id):  # destroyed since the check above
                raise _destroyed_error(tenant_id)
            raise DecryptionFailed(
                f"the key share of tenant {tenant_id} is not in {self._shares.directory}; was the "
                "share directory lost, or is this process not seeing the deployment's one?",
                reason="tenant_share_missing",
                tenant_id=tenant_id,
                kek_version=wrapped.kek_version,
            )
        key = tenant_wrapping_key(keks.raw[wrapped.kek_version], share, tenant_id, wrapped.kek_version)
        try:
            return _gcm_unwrap(AESGCM(key), wrapped, tenant_id)
        except DecryptionFailed as exc:
            if self._shares.destroyed(tenant_id):  # we read the share while it was being overwritten
                raise _destroyed_error(tenant_id) from exc
            raise

    def destroy_tenant(self, tenant_id: str) -> None:
        """Destroy the tenant's key share (see the class docstring); idempotent.

        Works for a tenant that never had a share too: the tombstone keeps one from ever
        being made. Drops the tenant's cached share in this process; other processes
        refuse the tenant from their next wrap or unwrap on.

        Raises:
            ConfigurationError: empty tenant id, or the share directory cannot be written.
        """
        if not isinstance(tenant_id, str) or not tenant_id:
            raise ConfigurationError("a tenant id is required (non-empty string)")
        self._shares.destroy(tenant_id)

    def tenant_destroyed(self, tenant_id: str) -> bool:
        """True once :meth:`destroy_tenant` ran for the tenant (in any process)."""
        return self._shares.destroyed(tenant_id)

    def forget(self, tenant_id: str) -> None:
        """Drop the tenant's cached share in this process (on suspend or delete; called by
        :meth:`TenantKeyring.forget`). It is re-read from the share directory when needed."""
        self._shares.forget(tenant_id)

    def _refresh(self) -> _KekSet:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise ConfigurationError(f"key file {self._path} is gone: {exc.strerror}") from exc
        keks = self._keks
        if _signature(st) == keks.signature:
            return keks
        with self._lock:
            self._keks = _load_kek_file(self._path)
            return self._keks


# --- environment variable ---------------------------------------------------------------


class EnvKeyProvider:
    """One KEK from an environment variable holding base64 of 32 bytes.

    Read once, at construction. For rotation with this provider, move to a key file or a
    KMS (rotation needs the old version kept next to the new one).

    No shredding against backups: this provider has no writable place for per-tenant key
    material, so it does not implement :class:`TenantShredding` (it has no
    ``destroy_tenant``; :meth:`tenant_destroyed` is always False). It wraps in format 1,
    by the KEK alone; :meth:`TenantKeyring.shred` then only deletes the tenant's wrapped
    DEKs from the live database, and a database backup taken before the deletion, together
    with this KEK, still decrypts the tenant's data. Use :class:`FileKeyProvider` (or a
    KMS with a key per tenant) where deletion must hold against backups. It cannot open
    format-2 keys (``reason="tenant_share_unsupported"``).

    Args:
        var: the variable name.
        version: the KEK version to record in wrapped keys (default 1). When replacing
            the key, a new value must come with a new version, and the DEKs must be
            re-wrapped while both are available (e.g. through a key file).

    Raises:
        ConfigurationError: the variable is unset, not base64, or not 32 bytes. The
            message never contains the value.
    """

    def __init__(self, var: str = "PATINOX_KEK", *, version: int = 1) -> None:
        if _ENV_VAR_RE.fullmatch(var) is None:
            raise ConfigurationError(f"not an environment variable name: {var!r}")
        if isinstance(version, bool) or not 1 <= version <= MAX_KEY_VERSION:
            raise ConfigurationError(f"KEK versions are integers in 1..{MAX_KEY_VERSION}")
        value = os.environ.get(var)
        if not value:
            raise ConfigurationError(
                f"environment variable {var} is not set; it must hold base64 of 32 bytes"
            )
        try:
            key = base64.b64decode(value.strip(), validate=True)
        except binascii.Error:
            key = b""
        if len(key) != _KEK_BYTES:
            raise ConfigurationError(
                f"environment variable {var} must hold base64 of exactly 32 bytes; make one with "
                "`python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'`"
            )
        self._var = var
        self._version = version
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return f"EnvKeyProvider({self._var!r}, version={self._version})"

    def kek_version(self) -> int:
        """The one KEK version (the ``version`` given at construction)."""
        return self._version

    def wrap(self, dek: bytes, *, tenant_id: str) -> WrappedKey:
        """Wrap ``dek`` for ``tenant_id`` (AES-256-GCM, 12-byte nonce).

        Raises:
            ConfigurationError: ``dek`` is not 32 bytes.
        """
        return _gcm_wrap(self._aead, self._version, dek, tenant_id)

    def tenant_destroyed(self, tenant_id: str) -> bool:
        """Always False: this provider keeps nothing per tenant, so it cannot destroy anything."""
        return False

    def unwrap(self, wrapped: WrappedKey, *, tenant_id: str) -> bytes:
        """Unwrap a DEK wrapped (format 1) for ``tenant_id``.

        Raises:
            DecryptionFailed: another tenant's, altered, another KEK version's, or a
                format-2 key (``reason="tenant_share_unsupported"``: it needs the share
                directory of a :class:`FileKeyProvider`).
        """
        if wrapped.tenant_share:
            raise DecryptionFailed(
                f"this DEK was wrapped with a tenant key share, which {self._var} alone cannot "
                "open; use the FileKeyProvider (key file and share directory) that wrapped it",
                reason="tenant_share_unsupported",
                tenant_id=tenant_id,
                kek_version=wrapped.kek_version,
            )
        if wrapped.kek_version != self._version:
            raise DecryptionFailed(
                f"KEK version {wrapped.kek_version} is not the one in {self._var} (version {self._version})",
                reason="unknown_kek_version",
                tenant_id=tenant_id,
                kek_version=wrapped.kek_version,
            )
        return _gcm_unwrap(self._aead, wrapped, tenant_id)


# --- factory ----------------------------------------------------------------------------

_ACCEPTED = "file:///path/to/kek.json[?shares=/dir], env://VAR (default env var PATINOX_KEK)"


def key_provider_from_url(url: str) -> KeyProvider:
    """The key provider a URL names.

    Accepted URLs:

    * ``file:///abs/path/kek.json`` (or ``file:relative/path``) — :class:`FileKeyProvider`;
      the file must exist (``patinox init`` creates it). The tenants' key shares go in
      ``/abs/path/kek.json.tenants/`` unless ``?shares=/other/dir`` names another
      directory (needed when the key file is on a read-only mount).
    * ``env://VAR`` — :class:`EnvKeyProvider` reading ``VAR``; ``env://`` means ``PATINOX_KEK``.

    Raises:
        ConfigurationError: an unknown scheme (the message lists the accepted ones and
            does not repeat the URL), or whatever the chosen provider raises.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigurationError(
                f"a key file URL looks like file:///path/to/kek.json; accepted: {_ACCEPTED}"
            )
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"shares"})
        if unknown or len(query.get("shares", [])) > 1 or "" in query.get("shares", []):
            raise ConfigurationError(
                f"a key file URL takes one query parameter, shares=/dir; accepted: {_ACCEPTED}"
            )
        shares = query.get("shares", [None])[0]
        return FileKeyProvider(unquote(parts.path), shares_dir=shares)
    if scheme == "env":
        var = parts.netloc or parts.path.lstrip("/") or "PATINOX_KEK"
        return EnvKeyProvider(var)
    raise ConfigurationError(f"unknown key provider URL scheme {scheme!r}; accepted: {_ACCEPTED}")
