"""Tenant key shares: crypto-shredding that holds against database backups taken earlier.

A "backup" here is a copy of the wrapped DEK rows and of the ciphertexts taken before the
shred; it is restored into a fresh in-memory DEK store and read with the same key file.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from patinox.errors import ConfigurationError
from patinox.storage._crypto import shares as shares_module
from patinox.storage._crypto.fileutil import write_private_temp
from patinox.storage._crypto.shares import share_file_name, tenant_wrapping_key
from patinox.storage.crypto import (
    WRAPPED_FORMAT_KEK_ONLY,
    WRAPPED_FORMAT_TENANT_SHARE,
    DecryptionFailed,
    EnvKeyProvider,
    FileKeyProvider,
    InMemoryDekStore,
    TenantKeyring,
    TenantKeysDestroyed,
    TenantShredding,
    WrappedKey,
    decrypt,
    dek_wrap_aad,
    encrypt,
    key_provider_from_url,
)

A, B = "ten_a", "ten_b"
Backup = dict[str, list[tuple[int, bytes]]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def kek_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "kek.json"


@pytest.fixture
def provider(kek_path: Path) -> FileKeyProvider:
    return FileKeyProvider.create(kek_path)


@pytest.fixture
def store() -> InMemoryDekStore:
    return InMemoryDekStore()


@pytest.fixture
def keyring(store: InMemoryDekStore, provider: FileKeyProvider) -> TenantKeyring:
    return TenantKeyring(store, provider)


@pytest.fixture
def env_kek(monkeypatch: pytest.MonkeyPatch, kek_path: Path, provider: FileKeyProvider) -> str:
    """PATINOX_KEK set to the key file's KEK version 1 (the same KEK, without shares)."""
    doc = json.loads(kek_path.read_text())
    monkeypatch.setenv("PATINOX_KEK", doc["keys"]["1"])
    return str(doc["keys"]["1"])


def seal(keyring: TenantKeyring, tenant: str, data: bytes, row: str = "run_1") -> bytes:
    return encrypt(data, key=keyring.current_key(tenant), table="runs", record_id=row)


def open_(keyring: TenantKeyring, tenant: str, blob: bytes, row: str = "run_1") -> bytes:
    return decrypt(blob, key_lookup=keyring.key_lookup(tenant), tenant_id=tenant, table="runs", record_id=row)


def backup(store: InMemoryDekStore, *tenants: str) -> Backup:
    return {t: store.list_wrapped(t) for t in tenants}


def restore(saved: Backup) -> InMemoryDekStore:
    fresh = InMemoryDekStore()
    for tenant, rows in saved.items():
        for version, wrapped in rows:
            assert fresh.insert_wrapped_if_absent(tenant, version, wrapped)
    return fresh


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the backup guarantee ---------------------------------------------------------------


def test_a_backup_taken_before_shred_does_not_decrypt(
    kek_path: Path, store: InMemoryDekStore, provider: FileKeyProvider, keyring: TenantKeyring
) -> None:
    blob_a1 = seal(keyring, A, b"a's first secret")
    keyring.rotate_dek(A)
    blob_a2 = seal(keyring, A, b"a's second secret", row="run_2")
    blob_b = seal(keyring, B, b"b's secret")
    saved = backup(store, A, B)
    assert [v for v, _ in saved[A]] == [1, 2]

    keyring.shred(A)

    assert not provider.shares.share_path(A).exists()
    for reader in (provider, FileKeyProvider(kek_path)):  # this process, and a fresh one
        restored = TenantKeyring(restore(saved), reader)
        for blob, row in ((blob_a1, "run_1"), (blob_a2, "run_2")):
            with pytest.raises((TenantKeysDestroyed, DecryptionFailed)):
                open_(restored, A, blob, row=row)
        with pytest.raises(TenantKeysDestroyed):
            restored.current_key(A)  # and no new key (or share) is made for it
        assert open_(restored, B, blob_b) == b"b's secret"  # other tenants unaffected
    assert not provider.shares.share_path(A).exists()


def test_the_guarantee_is_cryptographic_not_just_the_tombstone(
    kek_path: Path, store: InMemoryDekStore, provider: FileKeyProvider, keyring: TenantKeyring
) -> None:
    """Even someone who deletes the tombstone, or holds the KEK itself, cannot unwrap."""
    blob = seal(keyring, A, b"secret")
    saved = backup(store, A)
    keyring.shred(A)
    tombstone = provider.shares.directory / (share_file_name(A) + ".destroyed")
    assert tombstone.exists()
    tombstone.unlink()

    with pytest.raises(DecryptionFailed) as err:
        open_(TenantKeyring(restore(saved), FileKeyProvider(kek_path)), A, blob)
    assert err.value.fields["reason"] == "tenant_share_missing"

    kek = base64.b64decode(json.loads(kek_path.read_text())["keys"]["1"])
    wrapped = WrappedKey.from_bytes(saved[A][0][1])
    assert wrapped.tenant_share
    with pytest.raises(Exception):  # noqa: B017 - any failure: the KEK alone is not the wrapping key
        AESGCM(kek).decrypt(wrapped.nonce, wrapped.ciphertext, dek_wrap_aad(A, 1))
    downgraded = b"\x01" + saved[A][0][1][1:]  # relabel as format 1 ("KEK only")
    with pytest.raises(DecryptionFailed):
        FileKeyProvider(kek_path).unwrap(WrappedKey.from_bytes(downgraded), tenant_id=A)


def test_shred_destroys_the_share_before_the_rows(store: InMemoryDekStore, provider: FileKeyProvider) -> None:
    """A crash between the two steps leaves the tenant undecryptable, never decryptable."""

    class CrashingStore(InMemoryDekStore):
        def destroy(self, tenant_id: str) -> None:
            raise RuntimeError("crash before the rows went")

    crashing = CrashingStore()
    keyring = TenantKeyring(crashing, provider)
    blob = seal(keyring, A, b"secret")
    with pytest.raises(RuntimeError):
        keyring.shred(A)
    assert crashing.list_wrapped(A)  # the rows are still there...
    after = TenantKeyring(crashing, provider)
    with pytest.raises(TenantKeysDestroyed):  # ...and useless
        open_(after, A, blob)
    for call in (after.current_key, after.rotate_dek):
        with pytest.raises(TenantKeysDestroyed):
            call(A)


def test_destroy_is_seen_by_a_provider_holding_the_share_in_cache(
    kek_path: Path, store: InMemoryDekStore, provider: FileKeyProvider
) -> None:
    other = FileKeyProvider(kek_path)  # another process
    blob = seal(TenantKeyring(store, provider), A, b"secret")
    assert open_(TenantKeyring(store, other), A, blob) == b"secret"
    assert other.shares.cached(A)
    saved = backup(store, A)
    TenantKeyring(store, provider).shred(A)
    assert other.tenant_destroyed(A)
    with pytest.raises(TenantKeysDestroyed):  # the tombstone is checked on every unwrap
        open_(TenantKeyring(restore(saved), other), A, blob)
    with pytest.raises(TenantKeysDestroyed):
        other.wrap(os.urandom(32), tenant_id=A)


def test_destroy_tenant_is_idempotent_and_works_before_any_share(provider: FileKeyProvider) -> None:
    assert isinstance(provider, TenantShredding)
    assert not provider.tenant_destroyed("ten_never")
    provider.destroy_tenant("ten_never")
    provider.destroy_tenant("ten_never")
    assert provider.tenant_destroyed("ten_never")
    with pytest.raises(TenantKeysDestroyed):
        provider.wrap(os.urandom(32), tenant_id="ten_never")
    assert not provider.shares.share_path("ten_never").exists()
    with pytest.raises(ConfigurationError):
        provider.destroy_tenant("")


def test_a_destroy_racing_the_first_wrap_leaves_no_share(
    provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = write_private_temp

    def destroy_in_between(path: Path, data: bytes) -> Path:
        tmp = real(path, data)
        provider.destroy_tenant(A)  # after the wrap's tombstone check, before it publishes
        return tmp

    monkeypatch.setattr(shares_module, "write_private_temp", destroy_in_between)
    with pytest.raises(TenantKeysDestroyed):
        provider.wrap(os.urandom(32), tenant_id=A)
    assert not provider.shares.share_path(A).exists()
    assert sorted(p.name for p in provider.shares.directory.iterdir()) == [share_file_name(A) + ".destroyed"]


def test_rewrap_all_skips_a_shredded_tenant_restored_from_a_backup(
    store: InMemoryDekStore, provider: FileKeyProvider, keyring: TenantKeyring
) -> None:
    seal(keyring, A, b"a")
    seal(keyring, B, b"b")
    saved = backup(store, A, B)
    keyring.shred(A)
    provider.rotate()
    restored = restore(saved)
    assert TenantKeyring(restored, provider).rewrap_all([A, B]) == 1  # B only; A stays useless
    assert {WrappedKey.from_bytes(w).kek_version for _, w in restored.list_wrapped(B)} == {2}


# --- the share files --------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_share_files_are_private(kek_path: Path, provider: FileKeyProvider, keyring: TenantKeyring,
                                 umask: int) -> None:  # fmt: skip
    old = os.umask(umask)
    try:
        seal(keyring, A, b"x")
    finally:
        os.umask(old)
    shares_dir = kek_path.with_name("kek.json.tenants")
    assert provider.shares_dir == shares_dir
    share = shares_dir / A
    assert mode(shares_dir) == 0o700
    assert mode(share) == 0o600
    assert len(share.read_bytes()) == 32
    assert [p.name for p in shares_dir.iterdir()] == [A]  # no temporary files left
    keyring.shred(A)
    tombstone = shares_dir / f"{A}.destroyed"
    assert mode(tombstone) == 0o600
    assert [p.name for p in shares_dir.iterdir()] == [tombstone.name]


def test_insecure_share_directory_or_file_is_refused(kek_path: Path, provider: FileKeyProvider) -> None:
    provider.wrap(os.urandom(32), tenant_id=A)
    provider.shares_dir.chmod(0o755)
    with pytest.raises(ConfigurationError, match="chmod 700"):
        FileKeyProvider(kek_path).wrap(os.urandom(32), tenant_id=A)
    provider.shares_dir.chmod(0o700)
    share = provider.shares.share_path(A)
    share.chmod(0o644)
    wrapped = provider.wrap(os.urandom(32), tenant_id=A)  # cached: no disk read
    with pytest.raises(ConfigurationError, match="chmod 600"):
        FileKeyProvider(kek_path).unwrap(wrapped, tenant_id=A)
    share.chmod(0o600)
    share.write_bytes(b"short")
    with pytest.raises(ConfigurationError, match="malformed"):
        FileKeyProvider(kek_path).unwrap(wrapped, tenant_id=A)


@pytest.mark.parametrize(
    ("tenant", "name"),
    [("ten_a", "ten_a"), ("a/b", "a%2Fb"), ("..", "%2E%2E"), ("a.destroyed", "a%2Edestroyed"),
     ("é", "%C3%A9")],
)  # fmt: skip
def test_share_file_names_are_injective_and_stay_in_the_directory(
    provider: FileKeyProvider, tenant: str, name: str
) -> None:
    assert share_file_name(tenant) == name
    dek = os.urandom(32)
    assert provider.unwrap(provider.wrap(dek, tenant_id=tenant), tenant_id=tenant) == dek
    assert (provider.shares_dir / name).is_file()
    assert [p.name for p in provider.shares_dir.iterdir()] == [name]


def test_long_tenant_ids_get_a_hashed_name() -> None:
    long_id = "t" * 300
    name = share_file_name(long_id)
    assert name.startswith("#") and len(name) == 65
    assert name != share_file_name("t" * 301)


def test_shares_dir_elsewhere(tmp_path: Path, kek_path: Path, provider: FileKeyProvider) -> None:
    elsewhere = tmp_path / "shares"
    via_url = key_provider_from_url(f"file://{kek_path}?shares={elsewhere}")
    assert isinstance(via_url, FileKeyProvider)
    assert via_url.shares_dir == elsewhere
    via_url.wrap(os.urandom(32), tenant_id=A)
    assert (elsewhere / A).is_file() and mode(elsewhere) == 0o700
    for bad in ("?other=1", "?shares=", "?shares=/a&shares=/b"):
        with pytest.raises(ConfigurationError, match="shares="):
            key_provider_from_url(f"file://{kek_path}{bad}")
    unwritable = tmp_path / "ro"
    unwritable.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(ConfigurationError, match="shares_dir"):
            FileKeyProvider(kek_path, shares_dir=unwritable / "shares").wrap(os.urandom(32), tenant_id=A)


def test_shares_are_cached_for_a_bounded_time(kek_path: Path, provider: FileKeyProvider) -> None:
    clock = FakeClock()
    reader = FileKeyProvider(kek_path, share_ttl_s=60, clock=clock)
    reads: list[Path] = []
    real_read = reader.shares._read

    def counting_read(path: Path) -> bytes | None:
        reads.append(path)
        return real_read(path)

    reader.shares._read = counting_read  # type: ignore[method-assign]
    wrapped = provider.wrap(os.urandom(32), tenant_id=A)
    reader.unwrap(wrapped, tenant_id=A)
    reader.unwrap(wrapped, tenant_id=A)
    assert len(reads) == 1 and reader.shares.cached(A)
    clock.now += 61
    assert not reader.shares.cached(A)
    reader.unwrap(wrapped, tenant_id=A)
    assert len(reads) == 2
    TenantKeyring(InMemoryDekStore(), reader).forget(A)  # on suspend: the share goes too
    assert not reader.shares.cached(A)
    reader.unwrap(wrapped, tenant_id=A)
    assert len(reads) == 3 and reader.shares.cached(A)
    reader.destroy_tenant(A)
    assert not reader.shares.cached(A)  # destroy drops the entry
    with pytest.raises(ConfigurationError):
        FileKeyProvider(kek_path, share_ttl_s=0)


# --- concurrency ------------------------------------------------------------------------

THREADS = 16


@pytest.fixture
def link_barrier(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Barrier]:
    """Hold every first writer after it wrote its candidate share, so all race to publish."""
    barrier = threading.Barrier(THREADS)
    real = write_private_temp

    def wait_then_publish(path: Path, data: bytes) -> Path:
        tmp = real(path, data)
        barrier.wait(timeout=10)
        return tmp

    monkeypatch.setattr(shares_module, "write_private_temp", wait_then_publish)
    yield barrier


def test_concurrent_first_wraps_create_one_share(
    kek_path: Path, provider: FileKeyProvider, link_barrier: threading.Barrier
) -> None:
    providers = [provider, FileKeyProvider(kek_path)]  # two instances: as two processes
    deks = [os.urandom(32) for _ in range(THREADS)]

    def first_wrap(i: int) -> WrappedKey:
        return providers[i % 2].wrap(deks[i], tenant_id="ten_new")

    with ThreadPoolExecutor(THREADS) as pool:
        wrapped = list(pool.map(first_wrap, range(THREADS)))

    assert [p.name for p in provider.shares_dir.iterdir()] == ["ten_new"]  # one share, no temp files
    for i, w in enumerate(wrapped):  # every racer wrapped with the one share that won
        for p in (*providers, FileKeyProvider(kek_path)):
            assert p.unwrap(w, tenant_id="ten_new") == deks[i]


def test_concurrent_first_current_key_with_shares(
    kek_path: Path, provider: FileKeyProvider, link_barrier: threading.Barrier
) -> None:
    store = InMemoryDekStore()
    providers = [provider, FileKeyProvider(kek_path)]
    start = threading.Barrier(THREADS)

    def first_write(i: int) -> tuple[bytes, bytes]:
        keyring = TenantKeyring(store, providers[i % 2])  # a keyring per thread
        start.wait(timeout=10)
        blob = seal(keyring, A, f"row {i}".encode(), row=f"r{i}")
        return blob, keyring.current_key(A).key

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(first_write, range(THREADS)))

    assert [v for v, _ in store.list_wrapped(A)] == [1]
    assert len({key for _, key in results}) == 1
    assert [p.name for p in provider.shares_dir.iterdir()] == [A]
    reader = TenantKeyring(store, FileKeyProvider(kek_path))
    for i, (blob, _) in enumerate(results):
        assert open_(reader, A, blob, row=f"r{i}") == f"row {i}".encode()


# --- compatibility and rotation ---------------------------------------------------------


def test_format_1_wrapped_keys_still_unwrap_and_rewrap_upgrades_them(
    kek_path: Path, store: InMemoryDekStore, provider: FileKeyProvider, env_kek: str
) -> None:
    # A deployment from before key shares: DEKs wrapped by the KEK alone (format 1).
    old_keyring = TenantKeyring(store, EnvKeyProvider())
    blob = seal(old_keyring, A, b"written before shares")
    (_, raw), = store.list_wrapped(A)  # fmt: skip
    assert raw[0] == WRAPPED_FORMAT_KEK_ONLY
    assert not provider.shares.share_path(A).exists()

    keyring = TenantKeyring(store, provider)
    assert open_(keyring, A, blob) == b"written before shares"  # backward compatible
    pre_upgrade = backup(store, A)

    assert keyring.rewrap_all([A]) == 1  # same KEK version, but upgraded to format 2
    (_, raw), = store.list_wrapped(A)  # fmt: skip
    assert raw[0] == WRAPPED_FORMAT_TENANT_SHARE
    assert keyring.rewrap_all([A]) == 0
    assert open_(TenantKeyring(store, FileKeyProvider(kek_path)), A, blob) == b"written before shares"
    post_upgrade = backup(store, A)

    keyring.shred(A)
    with pytest.raises((TenantKeysDestroyed, DecryptionFailed)):
        open_(TenantKeyring(restore(post_upgrade), FileKeyProvider(kek_path)), A, blob)
    # A format-1 copy from before the upgrade is refused by the provider (tombstone) too;
    # only the upgraded one is protected cryptographically (see the crypto module docstring).
    with pytest.raises(TenantKeysDestroyed):
        open_(TenantKeyring(restore(pre_upgrade), FileKeyProvider(kek_path)), A, blob)


def test_kek_rotation_and_rewrap_keep_the_shares(
    kek_path: Path, store: InMemoryDekStore, provider: FileKeyProvider, keyring: TenantKeyring
) -> None:
    blobs = {t: seal(keyring, t, f"data of {t}".encode()) for t in (A, B)}
    keyring.rotate_dek(A)
    shares_before = {t: provider.shares.share_path(t).read_bytes() for t in (A, B)}
    before_rotation = backup(store, A, B)

    assert provider.rotate() == 2
    assert keyring.rewrap_all([A, B]) == 3
    for t in (A, B):
        wrapped = [WrappedKey.from_bytes(raw) for _, raw in store.list_wrapped(t)]
        assert {(w.kek_version, w.tenant_share) for w in wrapped} == {(2, True)}
        assert provider.shares.share_path(t).read_bytes() == shares_before[t]  # same share
    assert keyring.rewrap_all([A, B]) == 0

    fresh = TenantKeyring(store, FileKeyProvider(kek_path))
    for t, blob in blobs.items():
        assert open_(fresh, t, blob) == f"data of {t}".encode()
    new_blob = seal(fresh, A, b"after rotation", row="r2")

    after_rotation = backup(store, A, B)
    keyring.shred(A)
    for saved in (before_rotation, after_rotation):
        restored = TenantKeyring(restore(saved), FileKeyProvider(kek_path))
        for blob, row in ((blobs[A], "run_1"), (new_blob, "r2")):
            with pytest.raises((TenantKeysDestroyed, DecryptionFailed)):
                open_(restored, A, blob, row=row)
        assert open_(restored, B, blobs[B]) == f"data of {B}".encode()


def test_the_wrapping_key_depends_on_share_tenant_and_version() -> None:
    kek, share = os.urandom(32), os.urandom(32)
    base = tenant_wrapping_key(kek, share, A, 1)
    assert len(base) == 32
    assert base == tenant_wrapping_key(kek, share, A, 1)
    others = {
        tenant_wrapping_key(kek, os.urandom(32), A, 1),
        tenant_wrapping_key(kek, share, B, 1),
        tenant_wrapping_key(kek, share, A, 2),
        tenant_wrapping_key(kek, share, "ten_a1", 1),  # "ten_a" + "1|..." vs "ten_a1" + "|..."
        tenant_wrapping_key(os.urandom(32), share, A, 1),
    }
    assert base not in others and len(others) == 5


# --- EnvKeyProvider: no shredding against backups ---------------------------------------


def test_env_provider_cannot_shred_against_backups_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Documented weaker guarantee: with a KEK from the environment only the live rows go;
    a backup taken before the deletion still decrypts with that KEK."""
    monkeypatch.setenv("PATINOX_KEK", base64.b64encode(os.urandom(32)).decode())
    provider = EnvKeyProvider()
    assert not isinstance(provider, TenantShredding)
    assert not hasattr(provider, "destroy_tenant")
    store = InMemoryDekStore()
    keyring = TenantKeyring(store, provider)
    blob = seal(keyring, A, b"secret")
    assert store.list_wrapped(A)[0][1][0] == WRAPPED_FORMAT_KEK_ONLY
    saved = backup(store, A)

    with caplog.at_level(logging.WARNING, logger="patinox.storage._crypto.keyring"):
        keyring.shred(A)
    assert "backups taken earlier still decrypt" in caplog.text
    assert not provider.tenant_destroyed(A)
    with pytest.raises(TenantKeysDestroyed):
        open_(keyring, A, blob)  # the live database: shredded
    assert open_(TenantKeyring(restore(saved), EnvKeyProvider()), A, blob) == b"secret"  # the backup: not


def test_env_provider_refuses_format_2_keys(provider: FileKeyProvider, env_kek: str) -> None:
    wrapped = provider.wrap(os.urandom(32), tenant_id=A)
    with pytest.raises(DecryptionFailed) as err:
        EnvKeyProvider().unwrap(wrapped, tenant_id=A)
    assert err.value.fields["reason"] == "tenant_share_unsupported"
