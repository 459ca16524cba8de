"""Per-tenant key shares: 32-byte secrets kept outside the database, destroyed on shredding.

A tenant's DEKs are wrapped by a key derived from the KEK *and* the tenant's share
(:func:`tenant_wrapping_key`). The share never enters the database, so once it is
destroyed the wrapped DEKs in every database backup are useless, KEK or not.

On disk (one directory, by default ``<kek file>.tenants/``, mode 0700)::

    <name>             the share: exactly 32 random bytes, mode 0600
    <name>.destroyed   tombstone: the tenant was shredded (empty, mode 0600); never removed
    .<name>.<hex>.tmp  a share being written (published with link(2), then removed)

``<name>`` is the tenant id with every byte outside ``[A-Za-z0-9_-]`` written ``%XX``
(so ``ten_a`` is ``ten_a`` and ``a/b`` is ``a%2Fb``: injective, never ``.`` or ``..``);
an id whose name would pass 200 characters becomes ``#`` + SHA-256 hex of its UTF-8.

A share is created on the first wrap for its tenant: written to a temporary file,
synced, then hard-linked into place. ``link`` fails when the name exists, so of
concurrent first writers (threads or processes) exactly one publishes, and the others
read the winner's share. Destroying writes the tombstone (synced) first, then
overwrites the share in place, syncs, unlinks it and syncs the directory; a writer that
published a share concurrently re-checks the tombstone after publishing and removes its
share itself, so no share of a shredded tenant survives either order.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from patinox.errors import ConfigurationError
from patinox.storage._crypto.errors import TenantKeysDestroyed
from patinox.storage._crypto.fileutil import fsync_dir, write_private_temp

__all__ = ["SHARE_BYTES", "TenantShares", "share_file_name", "tenant_wrapping_key"]

SHARE_BYTES = 32
"""Length of a tenant key share in bytes."""

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_NAME = 200
_TOMBSTONE = ".destroyed"
_CREATE_RETRIES = 5


def share_file_name(tenant_id: str) -> str:
    """The file name of a tenant's share inside the share directory (see the module docstring)."""
    raw = tenant_id.encode("utf-8")
    name = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)
    return name if len(name) <= _MAX_NAME else "#" + hashlib.sha256(raw).hexdigest()


def tenant_wrapping_key(kek: bytes, share: bytes, tenant_id: str, kek_version: int) -> bytes:
    """The 32-byte key that wraps a tenant's DEKs under one KEK version (wrapped-key format 2).

    HKDF-SHA256 (RFC 5869) with ``ikm = KEK``, ``salt = share`` and
    ``info = b"patinox-tenant-kek|" + tenant_id (UTF-8) + b"|" + str(kek_version)``.
    Without the share the key cannot be computed, whoever holds the KEK.
    """
    info = b"patinox-tenant-kek|" + tenant_id.encode("utf-8") + b"|" + str(kek_version).encode("ascii")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=share, info=info).derive(kek)


class TenantShares:
    """The share directory of a :class:`FileKeyProvider`, with a per-tenant in-memory cache.

    A share read or created is cached for ``ttl_s`` seconds from when it was read (not
    extended by use), one entry per tenant; expired entries of idle tenants are swept at
    most once per ``ttl_s``. :meth:`destroy` drops the tenant's entry, and a read that
    straddles a :meth:`destroy` in this process is not cached.

    Args:
        directory: where the shares live; created (mode 0700) on the first share.
        ttl_s: lifetime of a cached share, seconds (> 0).
        clock: monotonic seconds; injectable for tests.

    Raises:
        ConfigurationError: ``ttl_s`` out of range.
    """

    def __init__(
        self, directory: Path, *, ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not ttl_s > 0:
            raise ConfigurationError("share_ttl_s must be > 0 seconds")
        self._dir = directory
        self._ttl_s = float(ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[bytes, float]] = {}
        self._epoch = 0
        self._next_sweep = clock() + self._ttl_s

    @property
    def directory(self) -> Path:
        """The share directory."""
        return self._dir

    def share_path(self, tenant_id: str) -> Path:
        """Where the tenant's share file is (it may not exist)."""
        return self._dir / share_file_name(tenant_id)

    def destroyed(self, tenant_id: str) -> bool:
        """True once :meth:`destroy` ran for the tenant (its tombstone exists)."""
        return os.path.lexists(self._tombstone(tenant_id))

    def get(self, tenant_id: str) -> bytes | None:
        """The tenant's share from the cache or the directory; ``None`` if it has none.

        Never creates one (this is the unwrap side).

        Raises:
            ConfigurationError: the directory or share file is insecure (group/other
                access), not a directory/regular file, or malformed.
        """
        return self._load(tenant_id, create=False)

    def get_or_create(self, tenant_id: str) -> bytes:
        """The tenant's share, created if it has none yet (the wrap side).

        Raises:
            TenantKeysDestroyed: the tenant was shredded (checked on every call, cached
                share or not).
            ConfigurationError: as :meth:`get`, or the directory cannot be created (e.g. a
                read-only mount: choose another ``shares_dir``).
        """
        self._refuse_destroyed(tenant_id)
        share = self._load(tenant_id, create=True)
        if share is None:  # pragma: no cover - _load(create=True) always returns a share
            raise ConfigurationError(f"no key share could be made for tenant {tenant_id}")
        return share

    def destroy(self, tenant_id: str) -> None:
        """Tombstone the tenant, then overwrite and unlink its share. Idempotent.

        Every step is synced before the next, so after a crash at any point the tenant
        is either still whole (no tombstone yet) or refused by every provider (tombstone).

        Raises:
            ConfigurationError: the directory cannot be created or is insecure.
        """
        self._ensure_dir()
        fd = os.open(self._tombstone(tenant_id), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self._dir)
        with self._lock:
            self._cache.pop(tenant_id, None)
            self._epoch += 1
        _wipe(self.share_path(tenant_id))

    def forget(self, tenant_id: str) -> None:
        """Drop the tenant's cached share (it is re-read from the directory when needed)."""
        with self._lock:
            self._cache.pop(tenant_id, None)
            self._epoch += 1

    def cached(self, tenant_id: str) -> bool:
        """True when the tenant's share is in the cache and unexpired."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get(tenant_id)
            return hit is not None and hit[1] > now

    # --- internals --------------------------------------------------------------------

    def _tombstone(self, tenant_id: str) -> Path:
        return self._dir / (share_file_name(tenant_id) + _TOMBSTONE)

    def _refuse_destroyed(self, tenant_id: str) -> None:
        if self.destroyed(tenant_id):
            raise TenantKeysDestroyed(
                f"the keys of tenant {tenant_id} were destroyed; its data cannot be decrypted",
                tenant_id=tenant_id,
            )

    def _load(self, tenant_id: str, *, create: bool) -> bytes | None:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(tenant_id)
            if hit is not None and hit[1] > now:
                return hit[0]
            epoch = self._epoch
        path = self.share_path(tenant_id)
        share = self._read(path)
        if share is None:
            if not create:
                return None
            share = self._create(tenant_id, path)
        self._remember(tenant_id, share, epoch)
        return share

    def _remember(self, tenant_id: str, share: bytes, epoch: int) -> None:
        now = self._clock()
        with self._lock:
            if epoch != self._epoch:
                return  # a destroy()/forget() ran while we read: do not resurrect what it dropped
            if now >= self._next_sweep:
                for tid in [t for t, (_, exp) in self._cache.items() if exp <= now]:
                    del self._cache[tid]
                self._next_sweep = now + self._ttl_s
            self._cache[tenant_id] = (share, now + self._ttl_s)

    def _check_dir(self) -> bool:
        """False when the directory does not exist; raises when it is not private."""
        try:
            st = os.stat(self._dir)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigurationError(f"tenant key share directory {self._dir} is not a directory")
        if st.st_mode & 0o077:
            raise ConfigurationError(
                f"tenant key share directory {self._dir} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it. Run `chmod 700 {self._dir}`."
            )
        return True

    def _ensure_dir(self) -> None:
        if self._check_dir():
            return
        try:
            os.mkdir(self._dir, 0o700)
        except FileExistsError:
            pass  # a concurrent first writer made it
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create tenant key share directory {self._dir}: {exc.strerror}. It must be "
                "writable by every patinox process of this deployment; choose another place with "
                "FileKeyProvider(..., shares_dir=DIR) or the URL file:///path/kek.json?shares=/DIR"
            ) from exc
        else:
            os.chmod(self._dir, 0o700)  # whatever the umask left
            fsync_dir(self._dir.parent)
        self._check_dir()

    def _read(self, path: Path) -> bytes | None:
        if not self._check_dir():
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigurationError(f"cannot open tenant key share {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigurationError(f"tenant key share {path} is not a regular file")
            if st.st_mode & 0o077:
                raise ConfigurationError(
                    f"tenant key share {path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it. Run `chmod 600 {path}`."
                )
            data = f.read(SHARE_BYTES + 1)
        if len(data) != SHARE_BYTES:
            raise ConfigurationError(f"tenant key share {path} is malformed (not {SHARE_BYTES} bytes)")
        return data

    def _create(self, tenant_id: str, path: Path) -> bytes:
        self._ensure_dir()
        for _ in range(_CREATE_RETRIES):
            share = os.urandom(SHARE_BYTES)
            tmp = write_private_temp(path, share)
            try:
                os.link(tmp, path)
                won = True
            except FileExistsError:
                won = False
            finally:
                tmp.unlink(missing_ok=True)
            if won:
                fsync_dir(self._dir)
                if self.destroyed(tenant_id):  # a destroy() raced us: take back what we published
                    _wipe(path)
                    self._refuse_destroyed(tenant_id)
                return share
            theirs = self._read(path)
            if theirs is not None:
                return theirs
            self._refuse_destroyed(tenant_id)  # only destroy() removes a share
        raise ConfigurationError(f"tenant key share {path} kept changing while being created")


def _wipe(path: Path) -> None:
    """Overwrite a share file in place with random bytes, sync, unlink, sync the directory.

    The overwrite is best effort: on copy-on-write or flash storage the old blocks may
    survive in the device; what the guarantee rests on is that the share is gone from
    the file system and from every backup kept (see :mod:`patinox.storage.crypto`).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        size = max(os.fstat(fd).st_size, SHARE_BYTES)
        os.pwrite(fd, os.urandom(size), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
