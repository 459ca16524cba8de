"""Key providers: who holds the KEK and wraps/unwraps tenant DEKs with it.

Wrapped-key format (:meth:`WrappedKey.to_bytes`, integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       4     KEK version (uint32, >= 1)
    5       1     nonce length N (0..255; 12 for the AES-GCM providers here, 0 for a KMS
                  whose ciphertext carries its own)
    6       N     nonce
    6+N     rest  wrapped DEK (for AES-GCM: 32-byte DEK ciphertext + 16-byte tag)

A DEK wrapped by :class:`FileKeyProvider` or :class:`EnvKeyProvider` is 66 bytes. The
wrapping AAD is ``b"patinox-dek|" + tenant_id (UTF-8) + b"|" + str(kek_version)``
(:func:`dek_wrap_aad`); the version is digits and comes last, so the split is
unambiguous, and a wrapped DEK moved to another tenant's row fails to unwrap.

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
import secrets
import stat
import struct
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from patinox.errors import ConfigurationError
from patinox.storage._crypto.aead import DEK_BYTES, MAX_KEY_VERSION
from patinox.storage._crypto.errors import DecryptionFailed

__all__ = [
    "EnvKeyProvider",
    "FileKeyProvider",
    "KeyProvider",
    "WrappedKey",
    "dek_wrap_aad",
    "key_provider_from_url",
]

WRAPPED_FORMAT_VERSION = 1
_WK_HEADER = struct.Struct(">BIB")  # format version, KEK version, nonce length
_KEK_BYTES = 32
_NONCE_BYTES = 12
_FILE_FORMAT = "patinox-kek"
_FILE_FORMAT_VERSION = 1
_ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A DEK encrypted under one KEK version; the only form in which a DEK is stored.

    Attributes:
        kek_version: version of the KEK that wrapped it, 1 .. 2**32-1.
        nonce: the wrapping nonce, 0..255 bytes (empty when the KMS ciphertext carries its own).
        ciphertext: the wrapped DEK, tag included.

    Raises:
        ConfigurationError: a field out of range.
    """

    kek_version: int
    nonce: bytes
    ciphertext: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.kek_version, bool) or not 1 <= self.kek_version <= MAX_KEY_VERSION:
            raise ConfigurationError(f"KEK versions are integers in 1..{MAX_KEY_VERSION}")
        if len(self.nonce) > 255:
            raise ConfigurationError("a wrapping nonce is at most 255 bytes")
        if not self.ciphertext:
            raise ConfigurationError("a wrapped key has a ciphertext")

    def to_bytes(self) -> bytes:
        """The stored form (format in the module docstring); 66 bytes for the AES-GCM providers."""
        header = _WK_HEADER.pack(WRAPPED_FORMAT_VERSION, self.kek_version, len(self.nonce))
        return header + self.nonce + self.ciphertext

    @classmethod
    def from_bytes(cls, data: bytes) -> WrappedKey:
        """Parse :meth:`to_bytes` output.

        Raises:
            DecryptionFailed: truncated or malformed bytes, or an unknown format version
                (``reason="malformed_wrapped_key"``).
        """
        try:
            fmt, version, nonce_len = _WK_HEADER.unpack_from(data)
            start = _WK_HEADER.size + nonce_len
            if fmt != WRAPPED_FORMAT_VERSION or len(data) <= start:
                raise ValueError("bad format version or length")
            return cls(version, bytes(data[_WK_HEADER.size : start]), bytes(data[start:]))
        except (struct.error, ValueError, ConfigurationError) as exc:
            raise DecryptionFailed("wrapped key is malformed", reason="malformed_wrapped_key") from exc


def dek_wrap_aad(tenant_id: str, kek_version: int) -> bytes:
    """The AAD (or KMS encryption context, as bytes) that binds a wrapped DEK to its tenant."""
    return b"patinox-dek|" + tenant_id.encode("utf-8") + b"|" + str(kek_version).encode("ascii")


class KeyProvider(Protocol):
    """Holds the KEK(s) and wraps/unwraps DEKs. Implementations must be thread-safe.

    A cloud KMS plugs in by implementing these three methods (see
    :mod:`patinox.storage.crypto`).
    """

    def kek_version(self) -> int:
        """The KEK version :meth:`wrap` uses now (>= 1)."""
        ...

    def wrap(self, dek: bytes, *, tenant_id: str) -> WrappedKey:
        """Encrypt ``dek`` under the current KEK, bound to ``tenant_id``.

        Raises:
            ConfigurationError: ``dek`` is not 32 bytes, or the KEK is unavailable.
        """
        ...

    def unwrap(self, wrapped: WrappedKey, *, tenant_id: str) -> bytes:
        """Decrypt a wrapped DEK, checking it was wrapped for ``tenant_id``.

        Returns:
            The 32 DEK bytes.

        Raises:
            DecryptionFailed: wrapped for another tenant, altered, or under a KEK version
                this provider does not hold.
        """
        ...


def _gcm_wrap(aead: AESGCM, kek_version: int, dek: bytes, tenant_id: str) -> WrappedKey:
    if not isinstance(dek, bytes) or len(dek) != DEK_BYTES:
        raise ConfigurationError(f"a DEK is {DEK_BYTES} bytes")
    if not tenant_id:
        raise ConfigurationError("a tenant id is required to wrap a DEK")
    nonce = os.urandom(_NONCE_BYTES)
    return WrappedKey(kek_version, nonce, aead.encrypt(nonce, dek, dek_wrap_aad(tenant_id, kek_version)))


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


def _write_private_temp(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """KEKs in a local JSON file of mode 0600, with versions for rotation.

    The embedded default (``patinox init`` creates the file). Several processes may share
    one file: :meth:`rotate` takes an exclusive lock and replaces the file atomically, and
    the others pick the new version up on their next :meth:`wrap` / :meth:`kek_version`
    (the file is ``stat``-ed, and re-read when it changed) or when asked to unwrap under
    a version they do not hold yet.

    Args:
        path: the key file.

    Raises:
        ConfigurationError: the file is missing, malformed, or accessible by group or
            others (the message says to run ``chmod 600 PATH``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._keks = _load_kek_file(self._path)

    def __repr__(self) -> str:
        return f"FileKeyProvider({str(self._path)!r}, kek_version={self._keks.current})"

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> FileKeyProvider:
        """Create a new key file holding a random KEK version 1, mode 0600, and open it.

        The file is written to a temporary name, synced, then hard-linked into place, so
        an existing key file is never overwritten and a crash leaves no half-written one.
        Missing parent folders are created with mode 0700.

        Raises:
            ConfigurationError: a file already exists at ``path``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = _write_private_temp(path, _encode_kek_file(1, {1: AESGCM.generate_key(bit_length=256)}))
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigurationError(f"key file {path} already exists; refusing to overwrite it") from None
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return cls(path)

    @property
    def path(self) -> Path:
        """The key file."""
        return self._path

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
            tmp = _write_private_temp(self._path, _encode_kek_file(new, raw))
            os.replace(tmp, self._path)
            _fsync_dir(self._path.parent)
            self._keks = _load_kek_file(self._path)
            return new

    def wrap(self, dek: bytes, *, tenant_id: str) -> WrappedKey:
        """Wrap ``dek`` for ``tenant_id`` under the current KEK (AES-256-GCM, 12-byte nonce).

        Raises:
            ConfigurationError: ``dek`` is not 32 bytes, or the key file is gone or insecure.
        """
        keks = self._refresh()
        return _gcm_wrap(keks.aeads[keks.current], keks.current, dek, tenant_id)

    def unwrap(self, wrapped: WrappedKey, *, tenant_id: str) -> bytes:
        """Unwrap a DEK wrapped for ``tenant_id`` by any version this file holds.

        Raises:
            DecryptionFailed: wrapped for another tenant or altered
                (``reason="dek_unwrap_failed"``), or a KEK version not in the file
                (``reason="unknown_kek_version"``: an old or wrong key file).
        """
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
        return _gcm_unwrap(aead, wrapped, tenant_id)

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
        if not _ENV_VAR_RE.match(var):
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

    def unwrap(self, wrapped: WrappedKey, *, tenant_id: str) -> bytes:
        """Unwrap a DEK wrapped for ``tenant_id``.

        Raises:
            DecryptionFailed: another tenant's, altered, or another KEK version's.
        """
        if wrapped.kek_version != self._version:
            raise DecryptionFailed(
                f"KEK version {wrapped.kek_version} is not the one in {self._var} (version {self._version})",
                reason="unknown_kek_version",
                tenant_id=tenant_id,
                kek_version=wrapped.kek_version,
            )
        return _gcm_unwrap(self._aead, wrapped, tenant_id)


# --- factory ----------------------------------------------------------------------------

_ACCEPTED = "file:///path/to/kek.json, env://VAR (default env var PATINOX_KEK)"


def key_provider_from_url(url: str) -> KeyProvider:
    """The key provider a URL names.

    Accepted URLs:

    * ``file:///abs/path/kek.json`` (or ``file:relative/path``) — :class:`FileKeyProvider`;
      the file must exist (``patinox init`` creates it).
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
        return FileKeyProvider(unquote(parts.path))
    if scheme == "env":
        var = parts.netloc or parts.path.lstrip("/") or "PATINOX_KEK"
        return EnvKeyProvider(var)
    raise ConfigurationError(f"unknown key provider URL scheme {scheme!r}; accepted: {_ACCEPTED}")
