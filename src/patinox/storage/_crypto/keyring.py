"""Per-tenant DEKs: created atomically, stored wrapped, cached decrypted for a bounded time."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from patinox.errors import ConfigurationError, StorageError
from patinox.storage._crypto.aead import DEK_BYTES, MAX_KEY_VERSION, DataKey, _check_tenant, _check_version
from patinox.storage._crypto.errors import DecryptionFailed, TenantKeysDestroyed
from patinox.storage._crypto.providers import KeyProvider, TenantShredding, WrappedKey

__all__ = ["DekStore", "InMemoryDekStore", "TenantKeyring"]

_log = logging.getLogger(__name__)

_RACE_RETRIES = 5


class DekStore(Protocol):
    """Where wrapped DEKs live: the storage side of :class:`TenantKeyring`.

    One row per (tenant id, DEK version) holding :meth:`WrappedKey.to_bytes` output, plus a
    record of destroyed tenants. The current version of a tenant is its highest version.
    A SQL implementation keys the table by ``(tenant_id, version)`` (a primary key or
    unique constraint) so that two concurrent writers of the same version, in any
    processes, end with one row: that constraint is what makes first-DEK creation and
    DEK rotation atomic. Implementations must be safe to call from many threads.
    """

    def get_wrapped(self, tenant_id: str, version: int | None = None) -> tuple[int, bytes] | None:
        """The ``(version, wrapped bytes)`` of a DEK; ``version=None`` means the current (highest).

        Returns:
            ``None`` when there is no such DEK, including for a destroyed tenant.
        """
        ...

    def list_wrapped(self, tenant_id: str) -> list[tuple[int, bytes]]:
        """Every ``(version, wrapped bytes)`` of the tenant, ascending; empty if none or destroyed."""
        ...

    def insert_wrapped_if_absent(self, tenant_id: str, version: int, wrapped: bytes) -> bool:
        """Insert a DEK row unless one with this (tenant, version) exists.

        Returns:
            True if this call inserted it; False if another writer won the race (the
            caller then re-reads) or the tenant is destroyed. The check against the
            destroyed record must be atomic with the insert.
        """
        ...

    def replace_wrapped(self, tenant_id: str, version: int, wrapped: bytes) -> bool:
        """Overwrite the wrapped bytes of an existing DEK row (KEK rotation re-wraps).

        Returns:
            False when the row does not exist (e.g. the tenant was destroyed meanwhile);
            never creates a row.
        """
        ...

    def destroy(self, tenant_id: str) -> None:
        """Delete every DEK row of the tenant and record it as destroyed, in one transaction.

        Idempotent. After it returns nothing of the tenant can be unwrapped, and
        :meth:`insert_wrapped_if_absent` refuses the tenant forever.
        """
        ...

    def is_destroyed(self, tenant_id: str) -> bool:
        """True once :meth:`destroy` ran for the tenant."""
        ...


class InMemoryDekStore:
    """A :class:`DekStore` in a dict, guarded by one lock; for tests and embedded use without a DB."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, dict[int, bytes]] = {}
        self._destroyed: set[str] = set()

    def get_wrapped(self, tenant_id: str, version: int | None = None) -> tuple[int, bytes] | None:
        """See :meth:`DekStore.get_wrapped`."""
        with self._lock:
            rows = self._rows.get(tenant_id)
            if not rows:
                return None
            v = max(rows) if version is None else version
            return (v, rows[v]) if v in rows else None

    def list_wrapped(self, tenant_id: str) -> list[tuple[int, bytes]]:
        """See :meth:`DekStore.list_wrapped`."""
        with self._lock:
            return sorted(self._rows.get(tenant_id, {}).items())

    def insert_wrapped_if_absent(self, tenant_id: str, version: int, wrapped: bytes) -> bool:
        """See :meth:`DekStore.insert_wrapped_if_absent`."""
        with self._lock:
            if tenant_id in self._destroyed:
                return False
            rows = self._rows.setdefault(tenant_id, {})
            if version in rows:
                return False
            rows[version] = bytes(wrapped)
            return True

    def replace_wrapped(self, tenant_id: str, version: int, wrapped: bytes) -> bool:
        """See :meth:`DekStore.replace_wrapped`."""
        with self._lock:
            rows = self._rows.get(tenant_id)
            if rows is None or version not in rows:
                return False
            rows[version] = bytes(wrapped)
            return True

    def destroy(self, tenant_id: str) -> None:
        """See :meth:`DekStore.destroy`."""
        with self._lock:
            self._rows.pop(tenant_id, None)
            self._destroyed.add(tenant_id)

    def is_destroyed(self, tenant_id: str) -> bool:
        """See :meth:`DekStore.is_destroyed`."""
        with self._lock:
            return tenant_id in self._destroyed


@dataclass
class _TenantCache:
    keys: OrderedDict[int, tuple[DataKey, float]] = field(default_factory=OrderedDict)  # LRU, expiry
    current: tuple[int, float] | None = None  # current version, expiry


class TenantKeyring:
    """A tenant's DEKs on demand: created on first use, unwrapped once, cached briefly.

    The decrypted-key cache is keyed by (tenant id, DEK version). Each entry lives at most
    ``ttl_s`` seconds from when it was unwrapped (not extended by use), and each tenant
    holds at most ``max_versions_per_tenant`` entries (least recently used dropped
    first), so one tenant's activity never evicts another's. The tenant's current
    version is cached for ``ttl_s`` too: a DEK rotation done by another process is seen
    within ``ttl_s`` (until then new blobs use the previous version, which stays valid).

    Args:
        store: where wrapped DEKs live.
        provider: the KEK holder that wraps and unwraps them.
        ttl_s: lifetime of a cached decrypted DEK, seconds (> 0).
        max_versions_per_tenant: cached DEK versions per tenant (>= 1).
        clock: monotonic seconds; injectable for tests.

    Raises:
        ConfigurationError: ``ttl_s`` or ``max_versions_per_tenant`` out of range.
    """

    def __init__(
        self,
        store: DekStore,
        provider: KeyProvider,
        *,
        ttl_s: float = 300.0,
        max_versions_per_tenant: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_s > 0:
            raise ConfigurationError("ttl_s must be > 0 seconds")
        if max_versions_per_tenant < 1:
            raise ConfigurationError("max_versions_per_tenant must be >= 1")
        self._store = store
        self._provider = provider
        self._ttl_s = float(ttl_s)
        self._max_per_tenant = max_versions_per_tenant
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, _TenantCache] = {}
        self._epoch = 0  # bumped by forget(): a load that straddles one is not cached
        self._next_sweep = clock() + self._ttl_s

    @property
    def provider(self) -> KeyProvider:
        """The key provider in use."""
        return self._provider

    # --- keys -------------------------------------------------------------------------

    def current_key(self, tenant_id: str) -> DataKey:
        """The tenant's current DEK, creating version 1 if it has none.

        Creation is atomic across threads and processes: every racer generates and wraps a
        candidate, :meth:`DekStore.insert_wrapped_if_absent` lets exactly one in, and the
        losers re-read and use the winner's DEK.

        Raises:
            TenantKeysDestroyed: the tenant was crypto-shredded.
            DecryptionFailed: the stored DEK does not unwrap (wrong KEK file, tampering).
            ConfigurationError: empty tenant id.
            StorageError: the store kept answering inconsistently.
        """
        _check_tenant(tenant_id)
        cached = self._cached_current(tenant_id)
        if cached is not None:
            return cached
        epoch = self._epoch
        for _ in range(_RACE_RETRIES):
            record = self._store.get_wrapped(tenant_id, None)
            if record is not None:
                key = self._unwrap(tenant_id, *record)
            else:
                self._raise_if_destroyed(tenant_id)
                created = self._create(tenant_id, 1)
                if created is None:
                    continue  # another writer won; re-read its DEK
                key = created
            self._remember(key, epoch, current=True)
            return key
        raise StorageError(f"DEK store answered inconsistently for tenant {tenant_id}", tenant_id=tenant_id)

    def key(self, tenant_id: str, version: int) -> DataKey:
        """The tenant's DEK at ``version`` (to decrypt a blob sealed with it).

        Raises:
            TenantKeysDestroyed: the tenant was crypto-shredded.
            DecryptionFailed: no DEK of that version (``reason="unknown_key_version"``; a
                tenant that never wrote has none), or it does not unwrap.
            ConfigurationError: empty tenant id.
        """
        _check_tenant(tenant_id)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_KEY_VERSION:
            raise DecryptionFailed("no such key version", reason="unknown_key_version", tenant_id=tenant_id)
        cached = self._cached(tenant_id, version)
        if cached is not None:
            return cached
        epoch = self._epoch
        record = self._store.get_wrapped(tenant_id, version)
        if record is None or record[0] != version:
            self._raise_if_destroyed(tenant_id)
            raise DecryptionFailed(
                f"tenant has no DEK version {version}",
                reason="unknown_key_version",
                tenant_id=tenant_id,
                key_version=version,
            )
        key = self._unwrap(tenant_id, *record)
        self._remember(key, epoch, current=False)
        return key

    def key_lookup(self, tenant_id: str) -> Callable[[int], DataKey]:
        """A ``key_lookup`` for :func:`decrypt` bound to one tenant."""
        return lambda version: self.key(tenant_id, version)

    def rotate_dek(self, tenant_id: str) -> DataKey:
        """Make a new DEK version current; older versions stay readable.

        Existing blobs are not touched (re-encrypting them is a background job that
        reads with :meth:`key` and writes with :meth:`current_key`). When two rotations
        race, both callers get the same single new version.

        Returns:
            The new current DEK.

        Raises:
            TenantKeysDestroyed: the tenant was crypto-shredded.
            DecryptionFailed: the current DEK does not unwrap.
            ConfigurationError: empty tenant id, or the version counter is exhausted.
        """
        _check_tenant(tenant_id)
        epoch = self._epoch
        record = self._store.get_wrapped(tenant_id, None)
        if record is None:
            return self.current_key(tenant_id)  # raises if destroyed; else version 1 is new
        if record[0] >= MAX_KEY_VERSION:
            raise ConfigurationError(f"tenant {tenant_id} has used every DEK version")
        created = self._create(tenant_id, record[0] + 1)
        if created is None:  # a concurrent rotation won (or the tenant was destroyed): use its result
            self._drop_current(tenant_id)
            return self.current_key(tenant_id)
        self._remember(created, epoch, current=True)
        return created

    def rewrap_all(self, tenant_ids: Iterable[str], provider: KeyProvider | None = None) -> int:
        """Re-wrap DEKs under ``provider``'s current KEK version, for KEK rotation.

        Data is not touched: only the wrapped form of each DEK changes. Each DEK is
        unwrapped, re-wrapped, checked to unwrap again to the same bytes, and only then
        replaced. The provider re-wraps with the tenant's key share as it wraps any DEK,
        so shares survive KEK rotation; a format-1 DEK (wrapped before shares) is
        re-wrapped too when the provider has :class:`TenantShredding`, even under the
        current KEK version, which makes it shreddable against backups from then on.
        Idempotent and resumable: DEKs already under the current version (and format)
        are skipped; destroyed tenants have none, or only rows the provider refuses
        (e.g. a database restored from a backup), which are skipped.

        Args:
            tenant_ids: tenants to process (e.g. every tenant id, streamed).
            provider: the KEK holder, which must hold both the old and the current KEK
                versions (a :class:`FileKeyProvider` after :meth:`FileKeyProvider.rotate`);
                default: this keyring's provider.

        Returns:
            The number of DEKs re-wrapped.

        Raises:
            DecryptionFailed: a DEK does not unwrap (the provider lacks its KEK version).
        """
        provider = provider if provider is not None else self._provider
        wants_share = isinstance(provider, TenantShredding)
        count = 0
        for tenant_id in tenant_ids:
            for version, raw in self._store.list_wrapped(tenant_id):
                target = provider.kek_version()
                old = WrappedKey.from_bytes(raw)
                if old.kek_version == target and (old.tenant_share or not wants_share):
                    continue
                try:
                    dek = provider.unwrap(old, tenant_id=tenant_id)
                except TenantKeysDestroyed:
                    break  # shredded: nothing of it is to be kept readable
                new = provider.wrap(dek, tenant_id=tenant_id)
                if provider.unwrap(new, tenant_id=tenant_id) != dek:
                    raise DecryptionFailed(
                        "re-wrapped DEK did not unwrap to the same key; nothing replaced",
                        reason="rewrap_check_failed",
                        tenant_id=tenant_id,
                        key_version=version,
                    )
                if self._store.replace_wrapped(tenant_id, version, new.to_bytes()):
                    count += 1
        return count

    def shred(self, tenant_id: str) -> None:
        """Crypto-shred a tenant: destroy its key material outside the database, then its
        wrapped DEKs in the store, then drop them from this cache.

        When the provider has :class:`TenantShredding` (:class:`FileKeyProvider`: the
        tenant's key share), :meth:`TenantShredding.destroy_tenant` runs first, so every
        copy of the wrapped DEKs, database backups taken earlier included, becomes
        useless; a crash between the two steps leaves the tenant undecryptable, never
        decryptable. Without it (:class:`EnvKeyProvider`) only the rows of the live
        database go, and a warning is logged: a database backup taken before, with the
        KEK, still decrypts the tenant.

        From then on nothing of the tenant decrypts (through this keyring at once; other
        processes' keyrings hold cached DEKs for at most ``ttl_s`` more seconds unless they
        are told to :meth:`forget`), and asking for its keys raises
        :class:`TenantKeysDestroyed`. Idempotent.
        """
        _check_tenant(tenant_id)
        if isinstance(self._provider, TenantShredding):
            self._provider.destroy_tenant(tenant_id)
        else:
            _log.warning(
                "tenant %s: %s cannot destroy per-tenant key material; its wrapped DEKs are deleted "
                "from the live database only, and database backups taken earlier still decrypt it "
                "with the KEK",
                tenant_id,
                type(self._provider).__name__,
            )
        self._store.destroy(tenant_id)
        self.forget(tenant_id)

    # --- cache ------------------------------------------------------------------------

    def forget(self, tenant_id: str) -> None:
        """Drop every cached DEK of the tenant (on suspend, delete, or a hint from another process).

        Also drops what the provider caches for the tenant, when it has a
        ``forget(tenant_id)`` method (:class:`FileKeyProvider`: the tenant's key share).
        """
        with self._lock:
            self._cache.pop(tenant_id, None)
            self._epoch += 1
        provider_forget = getattr(self._provider, "forget", None)
        if callable(provider_forget):
            provider_forget(tenant_id)

    def cached_versions(self, tenant_id: str) -> list[int]:
        """DEK versions of the tenant cached now (unexpired), least recently used first."""
        now = self._clock()
        with self._lock:
            entry = self._cache.get(tenant_id)
            return [v for v, (_, exp) in entry.keys.items() if exp > now] if entry else []

    def _cached(self, tenant_id: str, version: int) -> DataKey | None:
        now = self._clock()
        with self._lock:
            entry = self._cache.get(tenant_id)
            hit = entry.keys.get(version) if entry else None
            if entry is None or hit is None:
                return None
            if hit[1] <= now:
                del entry.keys[version]
                return None
            entry.keys.move_to_end(version)
            return hit[0]

    def _cached_current(self, tenant_id: str) -> DataKey | None:
        now = self._clock()
        with self._lock:
            entry = self._cache.get(tenant_id)
            current = entry.current if entry else None
            if current is None or current[1] <= now:
                return None
        return self._cached(tenant_id, current[0])

    def _drop_current(self, tenant_id: str) -> None:
        with self._lock:
            entry = self._cache.get(tenant_id)
            if entry is not None:
                entry.current = None

    def _remember(self, key: DataKey, epoch: int, *, current: bool) -> None:
        now = self._clock()
        expires = now + self._ttl_s
        with self._lock:
            if epoch != self._epoch:
                return  # a forget() ran while we loaded: do not resurrect what it dropped
            if now >= self._next_sweep:
                self._sweep(now)
            entry = self._cache.setdefault(key.tenant_id, _TenantCache())
            entry.keys[key.version] = (key, expires)
            entry.keys.move_to_end(key.version)
            while len(entry.keys) > self._max_per_tenant:
                entry.keys.popitem(last=False)
            if current and (entry.current is None or entry.current[0] <= key.version):
                entry.current = (key.version, expires)

    def _sweep(self, now: float) -> None:
        """Drop expired entries of every tenant (amortised: at most once per ``ttl_s``)."""
        for tenant_id in list(self._cache):
            entry = self._cache[tenant_id]
            for version in [v for v, (_, exp) in entry.keys.items() if exp <= now]:
                del entry.keys[version]
            if entry.current is not None and entry.current[1] <= now:
                entry.current = None
            if not entry.keys:
                del self._cache[tenant_id]
        self._next_sweep = now + self._ttl_s

    # --- store and provider -----------------------------------------------------------

    def _create(self, tenant_id: str, version: int) -> DataKey | None:
        _check_version(version)
        key = DataKey.generate(tenant_id, version)
        wrapped = self._provider.wrap(key.key, tenant_id=tenant_id).to_bytes()
        return key if self._store.insert_wrapped_if_absent(tenant_id, version, wrapped) else None

    def _unwrap(self, tenant_id: str, version: int, raw: bytes) -> DataKey:
        dek = self._provider.unwrap(WrappedKey.from_bytes(raw), tenant_id=tenant_id)
        if len(dek) != DEK_BYTES:
            raise DecryptionFailed("unwrapped DEK has the wrong length", reason="dek_unwrap_failed",
                                   tenant_id=tenant_id, key_version=version)  # fmt: skip
        return DataKey(tenant_id, version, dek)

    def _raise_if_destroyed(self, tenant_id: str) -> None:
        if self._store.is_destroyed(tenant_id) or self._provider_destroyed(tenant_id):
            raise TenantKeysDestroyed(
                f"the keys of tenant {tenant_id} were destroyed; its data cannot be decrypted",
                tenant_id=tenant_id,
            )

    def _provider_destroyed(self, tenant_id: str) -> bool:
        """The provider's record, which outlives a database restored from an earlier backup."""
        check = getattr(self._provider, "tenant_destroyed", None)
        return bool(check(tenant_id)) if callable(check) else False
