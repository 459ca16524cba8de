"""The control-plane read cache: API-key and agent lookups, per tenant, invalidated by a
change epoch every process of the deployment shares.

Every request looks up its API key (and its tenant's state, plan and limits), and every
run its agent definition: two reads, each a transaction of its own, on the hot path.
:class:`TenantCache` keeps their results in memory so that a request pays neither, and
stays correct across processes through :class:`ChangeEpoch`:

* every write to a tenant row, an API key or an agent (:class:`SqlBackend` and
  :class:`TenantStore` call :meth:`TenantCache.changed` *after* their transaction
  commits) increments the epoch;
* every lookup first reads the epoch; when it moved since the last lookup the whole cache
  is emptied, so a revocation, suspension, deletion, plan change or agent edit made by
  any process is seen by the next lookup of every process;
* a value read from the database is kept only if the epoch did not move while it was
  read (a lookup that straddles a change keeps nothing).

The epoch lives where every process of a deployment can read it for the price of two
system calls: for a SQLite deployment (all processes necessarily on the host that holds
the database file) an 8-byte file beside the database (``<database>.epoch``); for an
in-memory SQLite database a counter in the process. A PostgreSQL deployment may span
hosts, where no such shared file exists, so there the cache is off and every lookup
reads the database (:func:`epoch_for_url` returns ``None``).

Bounds: entries are grouped by tenant (operator keys under ``None``); a tenant holds at
most ``max_per_tenant`` entries (least recently used dropped first), so one tenant's keys
or agents never evict another's; at most ``max_tenants`` tenants are held (the least
recently used tenant's entries go first); each entry lives at most ``ttl_s`` seconds
(a safety net for a process that died between its commit and its epoch increment).

Writes made to the database by anything other than Patinox (hand-written SQL) do not
move the epoch: they are seen after at most ``ttl_s`` seconds.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar, cast
from urllib.parse import unquote

from sqlalchemy.engine import make_url

from patinox.errors import ConfigurationError, StorageError

__all__ = ["MISS", "ChangeEpoch", "TenantCache", "copy_row", "epoch_for_url", "sqlite_target"]

_COUNTER: Final = struct.Struct("<Q")

#: Process-local epochs of named in-memory databases, by name.
_MEMORY_EPOCHS: dict[str, ChangeEpoch] = {}
_MEMORY_LOCK = threading.Lock()
_R = TypeVar("_R", bound=Mapping[str, Any])

#: Returned by :meth:`TenantCache.get` when nothing usable is cached.
MISS: Final = object()


class ChangeEpoch:
    """A 64-bit change counter shared by every process that opens the same file.

    The counter is read with ``pread`` (not through a memory map: a mapped file that is
    truncated, or whose page cannot be allocated on a full disk, kills the process with
    SIGBUS) and incremented under ``flock``. The file is reopened when it was deleted or
    replaced (every process then follows the file at ``path``), in a child after
    ``fork`` (a ``flock`` on an inherited descriptor does not exclude the parent), and
    on first use after :meth:`close`. A reopening changes :meth:`read`'s value, so a
    cache comparing it empties itself.

    Args:
        path: the counter's file (created with mode 0600, 8 bytes), or ``None`` for a
            counter private to this process.

    Raises:
        ConfigurationError: the file cannot be created or written.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._local = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = os.getpid()
        self._generation = 0  # reopenings of the file, high bits of read()
        if path is not None:
            self._fd = self._open(path)

    @staticmethod
    def _open(path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise ConfigurationError(f"cannot open the cache epoch file {path}: {err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < _COUNTER.size:
                    # Written, not ftruncate'd: the block is allocated now, not at a bump.
                    os.pwrite(fd, _COUNTER.pack(ChangeEpoch._value(fd)), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as err:
            os.close(fd)
            raise ConfigurationError(f"cannot write the cache epoch file {path}: {err}") from err
        return fd

    @staticmethod
    def _value(fd: int) -> int:
        raw = os.pread(fd, _COUNTER.size, 0)  # short if the file was truncated: zeros
        value: int = _COUNTER.unpack(raw.ljust(_COUNTER.size, b"\0"))[0]
        return value

    def _current(self, path: Path) -> int:
        """The descriptor of the file now at ``path`` (call with the lock held)."""
        fd = self._fd
        if fd is not None and self._pid == os.getpid() and os.fstat(fd).st_nlink > 0:
            return fd
        fresh = self._open(path)
        if fd is not None:
            os.close(fd)
        self._fd, self._pid = fresh, os.getpid()
        self._generation += 1
        return fresh

    def read(self) -> int:
        """The current value (plus ``reopenings << 64``: only compare it for equality)."""
        if self.path is None:
            return self._local
        with self._lock:
            return (self._generation << 64) | self._value(self._current(self.path))

    def bump(self) -> None:
        """Increment the counter (atomic across threads and, through ``flock``, processes).

        Raises:
            StorageError: the file could not be written (other processes then see the
                change only when their entries expire).
        """
        with self._lock:
            if self.path is None:
                self._local += 1
                return
            fd = self._current(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    os.pwrite(fd, _COUNTER.pack((self._value(fd) + 1) % (1 << 64)), 0)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError as err:
                raise StorageError(f"cannot increment the cache epoch in {self.path}: {err}") from err

    def close(self) -> None:
        """Close the file (idempotent); a later read or bump opens it again."""
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None


def epoch_for_url(url: str) -> ChangeEpoch | None:
    """The change epoch of the deployment whose database is ``url``: a file beside a
    SQLite database file, a process counter for an in-memory SQLite database, ``None``
    (no cache) for PostgreSQL."""
    target = sqlite_target(url)
    if target is None:
        return None
    in_memory, database = target
    if in_memory:
        if not database:
            return ChangeEpoch(None)  # a database of this engine alone
        # A named in-memory database is shared by every engine of the process that
        # opens it (cache=shared): so is its epoch.
        with _MEMORY_LOCK:
            return _MEMORY_EPOCHS.setdefault(database, ChangeEpoch(None))
    return ChangeEpoch(Path(f"{database}.epoch"))


def sqlite_target(url: str) -> tuple[bool, str] | None:
    """Where a SQLite URL's database lives: ``(False, file path)`` for a file (URI
    filenames resolved to their path), ``(True, name)`` in memory (``""``: private to one
    engine), ``None`` for another backend."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:"):
        return True, ""
    if database.startswith("file:"):
        # A URI filename (https://sqlite.org/uri.html): file:PATH, file:///PATH or
        # file://localhost/PATH, usually a database file other processes open too.
        target = database[len("file:") :]
        if target.startswith("//"):
            authority, _, rest = target[2:].partition("/")
            target = "/" + rest if authority in ("", "localhost") else ""
        target = unquote(target)
        if parsed.query.get("mode") == "memory" or target in ("", ":memory:"):
            return True, target
        database = target
    return False, database


class TenantCache:
    """Lookups cached per tenant, emptied whenever the change epoch moves.

    Use: ``seen = cache.epoch()``; ``value = cache.get(key)``; on :data:`MISS` read the
    database, then ``cache.put(tenant_id, key, value, seen)``. After committing a write
    that changes what a key or agent lookup returns, call :meth:`changed`.

    Args:
        epoch: the shared change counter, or ``None`` to cache nothing.
        ttl_s: most seconds an entry is kept (> 0).
        max_per_tenant: entries per tenant (>= 1).
        max_tenants: tenants held (>= 1).
        clock: monotonic seconds; injectable for tests.

    Raises:
        ConfigurationError: a bound out of range.
    """

    def __init__(
        self,
        epoch: ChangeEpoch | None,
        *,
        ttl_s: float = 30.0,
        max_per_tenant: int = 256,
        max_tenants: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_s > 0 or max_per_tenant < 1 or max_tenants < 1:
            raise ConfigurationError("cache bounds: ttl_s > 0, max_per_tenant >= 1, max_tenants >= 1")
        self._epoch = epoch
        self._ttl_s = float(ttl_s)
        self._max_per_tenant = max_per_tenant
        self._max_tenants = max_tenants
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = -1
        # tenant -> key -> (value, expiry); LRU at both levels.
        self._buckets: OrderedDict[str | None, OrderedDict[Hashable, tuple[Any, float]]] = OrderedDict()
        self._owner: dict[Hashable, str | None] = {}  # key -> its tenant

    @property
    def enabled(self) -> bool:
        """False when there is no shared epoch (PostgreSQL): nothing is cached."""
        return self._epoch is not None

    def epoch(self) -> int:
        """The current epoch, emptying the cache if it moved since the last call; pass it
        to :meth:`put` for a value read after this call. -1 when disabled."""
        if self._epoch is None:
            return -1
        now = self._epoch.read()
        if now != self._seen:
            with self._lock:
                if now != self._seen:
                    self._buckets.clear()
                    self._owner.clear()
                    self._seen = now
        return now

    def get(self, key: Hashable, default: Any = MISS) -> Any:
        """The cached value of ``key``, or ``default`` when there is none (call
        :meth:`epoch` first); ``default`` is :data:`MISS` unless given, for callers that
        may cache ``None``."""
        if self._epoch is None:
            return default
        with self._lock:
            tenant = self._owner.get(key, MISS)
            if tenant is MISS:
                return default
            bucket = self._buckets[tenant]  # type: ignore[index]
            value, expiry = bucket[key]
            if self._clock() >= expiry:
                del bucket[key], self._owner[key]
                return default
            bucket.move_to_end(key)
            self._buckets.move_to_end(tenant)  # type: ignore[arg-type]
            return value

    def put(self, tenant_id: str | None, key: Hashable, value: Any, seen: int) -> None:
        """Keep ``value`` for ``key`` of ``tenant_id`` if the epoch is still ``seen``."""
        if self._epoch is None or self._epoch.read() != seen:
            return
        with self._lock:
            if self._seen != seen:
                return
            if self._owner.get(key, tenant_id) != tenant_id:
                return  # a key already held by another tenant's bucket: never re-home it
            bucket = self._buckets.get(tenant_id)
            if bucket is None:
                bucket = self._buckets[tenant_id] = OrderedDict()
                while len(self._buckets) > self._max_tenants:
                    _, dropped = self._buckets.popitem(last=False)
                    for k in dropped:
                        del self._owner[k]
            bucket[key] = (value, self._clock() + self._ttl_s)
            bucket.move_to_end(key)
            self._buckets.move_to_end(tenant_id)
            self._owner[key] = tenant_id
            while len(bucket) > self._max_per_tenant:
                k, _ = bucket.popitem(last=False)
                del self._owner[k]

    def changed(self, tenant_id: str | None = None) -> None:
        """A write that changes lookups committed: drop ``tenant_id``'s entries here and
        move the epoch, so every process empties its cache on its next lookup."""
        if self._epoch is None:
            return
        with self._lock:
            for k in self._buckets.pop(tenant_id, {}):
                del self._owner[k]
        self._epoch.bump()

    def tenant_size(self, tenant_id: str | None) -> int:
        """Entries held for ``tenant_id`` (for tests and metrics)."""
        with self._lock:
            return len(self._buckets.get(tenant_id, ()))

    def close(self) -> None:
        """Release the epoch's file."""
        if self._epoch is not None:
            self._epoch.close()


def copy_row(row: _R) -> _R:
    """A copy of a cached row (a record of :mod:`patinox.storage.records`, of the same
    type) whose lists and dicts (JSON columns) are copies too, so a caller may change what
    it is given without changing the cache."""
    return cast(_R, {k: v.copy() if isinstance(v, list | dict) else v for k, v in row.items()})
