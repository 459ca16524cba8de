"""Envelope encryption: AAD binding, tamper detection, KEK/DEK rotation, atomic first DEK,
the per-tenant key cache, and crypto-shredding."""

from __future__ import annotations

import base64
import os
import pickle
import shutil
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from patinox.errors import ConfigurationError, OperationFailed
from patinox.storage.crypto import (
    BLOB_OVERHEAD,
    DataKey,
    DecryptionFailed,
    EnvKeyProvider,
    FileKeyProvider,
    InMemoryDekStore,
    KeyProvider,
    TenantKeyring,
    TenantKeysDestroyed,
    WrappedKey,
    blob_key_version,
    decrypt,
    decrypt_str,
    encrypt,
    encrypt_str,
    key_provider_from_url,
)

A, B = "ten_a", "ten_b"


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(InMemoryDekStore):
    """Counts reads, and can hold every inserter at a barrier to force the race."""

    def __init__(self, insert_barrier: threading.Barrier | None = None) -> None:
        super().__init__()
        self.reads = 0
        self.inserts = 0
        self._barrier = insert_barrier
        self.after_read: Callable[[], None] | None = None

    def get_wrapped(self, tenant_id: str, version: int | None = None) -> tuple[int, bytes] | None:
        self.reads += 1
        record = super().get_wrapped(tenant_id, version)
        if self.after_read is not None:
            self.after_read()
        return record

    def insert_wrapped_if_absent(self, tenant_id: str, version: int, wrapped: bytes) -> bool:
        self.inserts += 1
        if self._barrier is not None:
            self._barrier.wait(timeout=10)  # every racer has read "none" and made a candidate
        return super().insert_wrapped_if_absent(tenant_id, version, wrapped)


@pytest.fixture
def kek_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "kek.json"


@pytest.fixture
def provider(kek_path: Path) -> FileKeyProvider:
    return FileKeyProvider.create(kek_path)


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def keyring(store: CountingStore, provider: FileKeyProvider) -> TenantKeyring:
    return TenantKeyring(store, provider)


def seal(keyring: TenantKeyring, tenant: str, data: bytes, table: str = "runs", row: str = "run_1") -> bytes:
    return encrypt(data, key=keyring.current_key(tenant), table=table, record_id=row)


def open_(keyring: TenantKeyring, tenant: str, blob: bytes, table: str = "runs", row: str = "run_1") -> bytes:
    return decrypt(blob, key_lookup=keyring.key_lookup(tenant), tenant_id=tenant, table=table, record_id=row)


# --- payloads ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"x", b"secret agent memory" * 100, bytes(range(256))])
def test_round_trip(keyring: TenantKeyring, data: bytes) -> None:
    blob = seal(keyring, A, data)
    assert len(blob) == len(data) + BLOB_OVERHEAD
    assert len(data) < 8 or data not in blob  # a short plaintext can occur in random bytes by chance
    assert open_(keyring, A, blob) == data


def test_str_round_trip_and_fresh_nonce(keyring: TenantKeyring) -> None:
    key = keyring.current_key(A)
    one = encrypt_str("héllo ✓", key=key, table="t", record_id="r")
    two = encrypt_str("héllo ✓", key=key, table="t", record_id="r")
    assert one != two
    for blob in (one, two):
        assert decrypt_str(blob, key_lookup=keyring.key_lookup(A), tenant_id=A, table="t", record_id="r") == (
            "héllo ✓"
        )


def test_decrypt_str_refuses_non_utf8(keyring: TenantKeyring) -> None:
    blob = seal(keyring, A, b"\xff\xfe")
    with pytest.raises(DecryptionFailed) as err:
        decrypt_str(blob, key_lookup=keyring.key_lookup(A), tenant_id=A, table="runs", record_id="run_1")
    assert err.value.fields["reason"] == "not_utf8"


@pytest.mark.parametrize(
    ("tenant", "table", "row"),
    [
        (B, "runs", "run_1"),  # another tenant
        (A, "memory", "run_1"),  # another table
        (A, "runs", "run_2"),  # another row
        (A, "run", "srun_1"),  # same concatenation, other split: length prefixes tell them apart
        (A, "runsr", "un_1"),
    ],
)
def test_aad_binds_tenant_table_and_row(keyring: TenantKeyring, tenant: str, table: str, row: str) -> None:
    blob = seal(keyring, A, b"payload", table="runs", row="run_1")
    with pytest.raises(DecryptionFailed):
        open_(keyring, tenant, blob, table=table, row=row)
    assert open_(keyring, A, blob, table="runs", row="run_1") == b"payload"


def test_ciphertext_moved_to_another_tenant_fails_even_with_version_match(keyring: TenantKeyring) -> None:
    keyring.current_key(B)  # B has a DEK version 1 too
    blob = seal(keyring, A, b"payload")
    with pytest.raises(DecryptionFailed) as err:
        open_(keyring, B, blob)
    assert err.value.fields["reason"] == "authentication_failed"
    assert err.value.fields["tenant_id"] == B


def test_key_lookup_returning_another_tenants_key_is_refused(keyring: TenantKeyring) -> None:
    blob = seal(keyring, A, b"payload")
    with pytest.raises(DecryptionFailed) as err:
        decrypt(blob, key_lookup=keyring.key_lookup(A), tenant_id=B, table="runs", record_id="run_1")
    assert err.value.fields["reason"] == "key_mismatch"


def test_wrong_key_version_fails(keyring: TenantKeyring) -> None:
    blob = seal(keyring, A, b"payload")
    keyring.rotate_dek(A)
    relabelled = blob[:1] + (2).to_bytes(4, "big") + blob[5:]  # claims DEK version 2, which exists
    with pytest.raises(DecryptionFailed):
        open_(keyring, A, relabelled)
    missing = blob[:1] + (9).to_bytes(4, "big") + blob[5:]
    with pytest.raises(DecryptionFailed) as err:
        open_(keyring, A, missing)
    assert err.value.fields["reason"] == "unknown_key_version"


def test_every_single_bit_flip_is_detected(keyring: TenantKeyring) -> None:
    blob = seal(keyring, A, b"0123456789abcdef")
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[i] ^= bit
            with pytest.raises(DecryptionFailed):
                open_(keyring, A, bytes(tampered))


@pytest.mark.parametrize("blob", [b"", b"\x01\x00\x00\x00\x01" + b"\x00" * 20, b"\x02" + b"\x00" * 40])
def test_malformed_blobs_fail_closed(keyring: TenantKeyring, blob: bytes) -> None:
    keyring.current_key(A)
    with pytest.raises(DecryptionFailed):
        open_(keyring, A, blob)


def test_empty_binding_fields_are_misuse(keyring: TenantKeyring) -> None:
    key = keyring.current_key(A)
    with pytest.raises(ConfigurationError):
        encrypt(b"x", key=key, table="", record_id="r")
    with pytest.raises(ConfigurationError):
        decrypt(b"x" * 40, key_lookup=keyring.key_lookup(A), tenant_id=A, table="t", record_id="")
    with pytest.raises(ConfigurationError):
        keyring.current_key("")


def test_data_key_hides_its_bytes() -> None:
    key = DataKey.generate(A, 1)
    assert key.key.hex() not in repr(key)
    with pytest.raises(ConfigurationError):
        DataKey(A, 1, b"short")
    with pytest.raises(ConfigurationError):
        DataKey(A, 0, os.urandom(32))


# --- key providers ----------------------------------------------------------------------


def test_wrapped_key_format_round_trip(provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATINOX_KEK", base64.b64encode(os.urandom(32)).decode())
    # FileKeyProvider wraps with the tenant's key share: format 2; EnvKeyProvider: format 1.
    for wrapped, fmt in ((provider.wrap(os.urandom(32), tenant_id=A), 2),
                         (EnvKeyProvider().wrap(os.urandom(32), tenant_id=A), 1)):  # fmt: skip
        raw = wrapped.to_bytes()
        assert len(raw) == 66
        assert raw[0] == fmt and int.from_bytes(raw[1:5], "big") == 1 and raw[5] == 12
        assert wrapped.tenant_share is (fmt == 2) and wrapped.format_version == fmt
        assert WrappedKey.from_bytes(raw) == wrapped
        for bad in (b"", raw[:6], b"\x03" + raw[1:], b"\x00" + raw[1:], raw[:18]):
            with pytest.raises(DecryptionFailed):
                WrappedKey.from_bytes(bad)


def test_wrapped_dek_moved_to_another_tenant_fails_to_unwrap(provider: FileKeyProvider) -> None:
    dek = os.urandom(32)
    wrapped = provider.wrap(dek, tenant_id=A)
    assert provider.unwrap(wrapped, tenant_id=A) == dek
    with pytest.raises(DecryptionFailed) as err:
        provider.unwrap(wrapped, tenant_id=B)  # B has no key share yet
    assert err.value.fields["reason"] == "tenant_share_missing"
    provider.wrap(os.urandom(32), tenant_id=B)  # now it has one
    with pytest.raises(DecryptionFailed) as err:
        provider.unwrap(wrapped, tenant_id=B)
    assert err.value.fields["reason"] == "dek_unwrap_failed"


def test_wrapped_dek_row_copied_between_tenants_in_the_store(
    store: CountingStore, keyring: TenantKeyring
) -> None:
    keyring.current_key(A)
    row = store.get_wrapped(A)
    assert row is not None
    store.insert_wrapped_if_absent(B, 1, row[1])  # an attacker with database access copies A's DEK
    with pytest.raises(DecryptionFailed):
        keyring.current_key(B)


def test_key_file_is_created_private(kek_path: Path, provider: FileKeyProvider) -> None:
    assert stat.S_IMODE(kek_path.stat().st_mode) == 0o600
    assert provider.kek_version() == 1
    assert not list(kek_path.parent.glob("*.tmp"))
    with pytest.raises(ConfigurationError, match="already exists"):
        FileKeyProvider.create(kek_path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(kek_path: Path, provider: FileKeyProvider, mode: int) -> None:
    kek_path.chmod(mode)
    with pytest.raises(ConfigurationError, match=f"chmod 600 {kek_path}"):
        FileKeyProvider(kek_path)


def test_missing_or_malformed_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="patinox init"):
        FileKeyProvider(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "patinox-kek", "format_version": 1, "current": 1, "keys": {"1": "AA=="}}')
    bad.chmod(0o600)
    with pytest.raises(ConfigurationError, match="malformed"):
        FileKeyProvider(bad)


def test_env_key_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATINOX_KEK", base64.b64encode(os.urandom(32)).decode())
    provider = EnvKeyProvider()
    dek = os.urandom(32)
    assert provider.unwrap(provider.wrap(dek, tenant_id=A), tenant_id=A) == dek
    assert provider.kek_version() == 1
    with pytest.raises(DecryptionFailed):
        provider.unwrap(provider.wrap(dek, tenant_id=A), tenant_id=B)


@pytest.mark.parametrize("value", [None, "not base64!", base64.b64encode(b"sixteen bytes!!!").decode()])
def test_env_key_provider_refuses_bad_values(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("MY_KEK", raising=False)
    else:
        monkeypatch.setenv("MY_KEK", value)
    with pytest.raises(ConfigurationError, match="MY_KEK") as err:
        EnvKeyProvider("MY_KEK")
    assert value is None or value not in err.value.message


def test_key_provider_from_url(
    kek_path: Path, provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_file = key_provider_from_url(f"file://{kek_path}")
    assert isinstance(from_file, FileKeyProvider)
    dek = os.urandom(32)
    assert from_file.unwrap(provider.wrap(dek, tenant_id=A), tenant_id=A) == dek
    monkeypatch.setenv("SOME_KEK", base64.b64encode(os.urandom(32)).decode())
    assert isinstance(key_provider_from_url("env://SOME_KEK"), EnvKeyProvider)
    with pytest.raises(ConfigurationError, match=r"file:///.*env://"):
        key_provider_from_url("kms://arn:aws:kms:secret")
    # The variable's name is matched whole: "$" would also match before a final newline.
    monkeypatch.setenv("SOME_KEK\n", base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(ConfigurationError, match="not an environment variable name"):
        EnvKeyProvider("SOME_KEK\n")
    with pytest.raises(ConfigurationError):
        key_provider_from_url("file://otherhost/kek.json")


# --- rotation ---------------------------------------------------------------------------


def test_kek_rotation_rewraps_deks_and_old_data_still_decrypts(
    kek_path: Path, store: CountingStore, provider: FileKeyProvider
) -> None:
    keyring = TenantKeyring(store, provider)
    blobs = {t: seal(keyring, t, f"data of {t}".encode()) for t in (A, B)}
    keyring.rotate_dek(A)  # A has two DEK versions
    other_process = FileKeyProvider(kek_path)

    assert provider.rotate() == 2
    assert provider.versions() == (1, 2)
    assert other_process.kek_version() == 2  # picked up from the file
    assert keyring.rewrap_all([A, B, "ten_never_wrote"]) == 3
    for t in (A, B):
        assert {WrappedKey.from_bytes(raw).kek_version for _, raw in store.list_wrapped(t)} == {2}
    assert keyring.rewrap_all([A, B]) == 0  # idempotent

    fresh = TenantKeyring(store, FileKeyProvider(kek_path))  # no cache: unwraps under KEK 2
    for t, blob in blobs.items():
        assert open_(fresh, t, blob) == f"data of {t}".encode()


def test_unwrap_under_a_kek_version_the_file_lacks(kek_path: Path, provider: FileKeyProvider) -> None:
    old_copy = kek_path.with_name("old.json")
    shutil.copy2(kek_path, old_copy)
    provider.rotate()
    wrapped = provider.wrap(os.urandom(32), tenant_id=A)
    shutil.copy2(old_copy, kek_path)  # an operator restores an older key file
    with pytest.raises(DecryptionFailed, match="older copy") as err:
        FileKeyProvider(kek_path).unwrap(wrapped, tenant_id=A)
    assert err.value.fields["reason"] == "unknown_kek_version"


def test_dek_rotation_keeps_old_blobs_readable(keyring: TenantKeyring) -> None:
    old = seal(keyring, A, b"old")
    assert blob_key_version(old) == 1
    assert keyring.rotate_dek(A).version == 2
    assert keyring.current_key(A).version == 2
    new = seal(keyring, A, b"new")
    assert blob_key_version(new) == 2
    assert open_(keyring, A, old) == b"old"
    assert open_(keyring, A, new) == b"new"
    assert keyring.current_key(B).version == 1  # other tenants untouched


def test_dek_rotation_seen_by_another_keyring_after_ttl(
    store: CountingStore, provider: FileKeyProvider
) -> None:
    clock = FakeClock()
    mine, theirs = (TenantKeyring(store, provider, ttl_s=60, clock=clock) for _ in range(2))
    assert theirs.current_key(A).version == 1
    mine.rotate_dek(A)
    assert theirs.current_key(A).version == 1  # cached, still valid
    clock.now += 61
    assert theirs.current_key(A).version == 2


# --- concurrency ------------------------------------------------------------------------

THREADS = 16


@pytest.mark.parametrize("shared_keyring", [True, False], ids=["one-keyring", "keyring-per-thread"])
def test_concurrent_first_current_key_makes_one_dek(provider: FileKeyProvider, shared_keyring: bool) -> None:
    store = CountingStore(insert_barrier=threading.Barrier(THREADS))
    start = threading.Barrier(THREADS)
    one = TenantKeyring(store, provider)

    def first_write(_: int) -> DataKey:
        keyring = one if shared_keyring else TenantKeyring(store, provider)  # like separate processes
        start.wait(timeout=10)
        return keyring.current_key(A)

    with ThreadPoolExecutor(THREADS) as pool:
        keys = list(pool.map(first_write, range(THREADS)))

    assert store.inserts == THREADS  # the race really happened: every thread tried to insert
    assert [v for v, _ in store.list_wrapped(A)] == [1]
    assert len({k.key for k in keys}) == 1
    stored = TenantKeyring(store, provider).current_key(A)
    assert stored == keys[0]


@pytest.mark.parametrize("shared_keyring", [True, False], ids=["one-keyring", "keyring-per-thread"])
def test_concurrent_rotations_make_one_new_version(provider: FileKeyProvider, shared_keyring: bool) -> None:
    store = CountingStore()
    one = TenantKeyring(store, provider)
    one.current_key(A)
    store._barrier = threading.Barrier(8)  # from now on every rotation waits for the other seven

    def rotate(_: int) -> DataKey:
        return (one if shared_keyring else TenantKeyring(store, provider)).rotate_dek(A)

    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(rotate, range(8)))
    assert [v for v, _ in store.list_wrapped(A)] == [1, 2]
    assert {k.version for k in keys} == {2}
    assert len({k.key for k in keys}) == 1


# --- cache ------------------------------------------------------------------------------


def test_cache_is_bounded_per_tenant(store: CountingStore, provider: FileKeyProvider) -> None:
    keyring = TenantKeyring(store, provider, max_versions_per_tenant=3)
    keyring.current_key(B)
    keyring.current_key(A)
    for _ in range(10):
        keyring.rotate_dek(A)
    for v in range(1, 12):
        keyring.key(A, v)  # tenant A churns through 11 versions
    assert keyring.cached_versions(A) == [9, 10, 11]
    assert keyring.cached_versions(B) == [1]  # A never evicts B
    reads = store.reads
    keyring.key(B, 1)
    assert store.reads == reads


def test_cache_entries_expire_after_ttl(store: CountingStore, provider: FileKeyProvider) -> None:
    clock = FakeClock()
    keyring = TenantKeyring(store, provider, ttl_s=300, clock=clock)
    keyring.current_key(A)
    reads = store.reads
    clock.now += 299
    keyring.key(A, 1)
    keyring.current_key(A)
    assert store.reads == reads  # served from the cache
    clock.now += 2
    assert keyring.cached_versions(A) == []
    keyring.key(A, 1)
    assert store.reads == reads + 1


def test_expired_entries_of_idle_tenants_are_swept(store: CountingStore, provider: FileKeyProvider) -> None:
    clock = FakeClock()
    keyring = TenantKeyring(store, provider, ttl_s=10, clock=clock)
    for i in range(50):
        keyring.current_key(f"ten_{i}")
    clock.now += 11
    keyring.current_key("ten_new")
    assert keyring.cached_versions("ten_0") == []
    assert len(keyring._cache) == 1  # memory held only for tenants active within ttl_s


def test_forget_drops_one_tenant_only(store: CountingStore, keyring: TenantKeyring) -> None:
    keyring.current_key(A)
    keyring.current_key(B)
    keyring.forget(A)
    assert keyring.cached_versions(A) == []
    assert keyring.cached_versions(B) == [1]
    reads = store.reads
    keyring.current_key(A)
    assert store.reads == reads + 1


@pytest.mark.parametrize("with_shares", [True, False], ids=["file-provider", "env-provider"])
def test_a_load_racing_forget_is_not_cached(
    store: CountingStore, provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch, with_shares: bool
) -> None:
    monkeypatch.setenv("PATINOX_KEK", base64.b64encode(os.urandom(32)).decode())
    keyring = TenantKeyring(store, provider if with_shares else EnvKeyProvider())
    keyring.current_key(A)
    keyring.forget(A)
    fetched, resume = threading.Event(), threading.Event()

    def pause() -> None:
        store.after_read = None
        fetched.set()
        assert resume.wait(timeout=10)

    store.after_read = pause
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(keyring.key, A, 1)
        assert fetched.wait(timeout=10)  # the wrapped DEK is read, not yet cached
        keyring.shred(A)
        resume.set()
        if with_shares:  # the share is gone: the in-flight unwrap itself is refused
            with pytest.raises(TenantKeysDestroyed):
                loading.result()
        else:  # the DEK was already read: the load completes, but is not cached
            loading.result()
    assert keyring.cached_versions(A) == []
    with pytest.raises(TenantKeysDestroyed):
        keyring.key(A, 1)


# --- crypto-shredding -------------------------------------------------------------------


def test_shred_makes_everything_of_the_tenant_undecryptable(
    store: CountingStore, provider: FileKeyProvider, keyring: TenantKeyring
) -> None:
    blob_a = seal(keyring, A, b"a's data")
    blob_b = seal(keyring, B, b"b's data")
    other_process = TenantKeyring(store, provider)
    keyring.shred(A)

    with pytest.raises(TenantKeysDestroyed) as err:
        open_(keyring, A, blob_a)
    assert err.value.fields["tenant_id"] == A
    for call in (keyring.current_key, keyring.rotate_dek, other_process.current_key):
        with pytest.raises(TenantKeysDestroyed):
            call(A)
    assert store.list_wrapped(A) == []
    assert not store.insert_wrapped_if_absent(A, 1, b"late writer")
    assert open_(keyring, B, blob_b) == b"b's data"  # other tenants unaffected
    keyring.shred(A)  # idempotent


def test_destroyed_is_distinguishable_from_no_key_yet(keyring: TenantKeyring) -> None:
    with pytest.raises(DecryptionFailed) as err:
        keyring.key("ten_fresh", 1)
    assert not isinstance(err.value, TenantKeysDestroyed)
    assert err.value.fields["reason"] == "unknown_key_version"
    assert keyring.current_key("ten_fresh").version == 1


def test_errors_are_structured_and_picklable() -> None:
    for cls, code in (
        (DecryptionFailed, "decryption_failed"),
        (TenantKeysDestroyed, "tenant_keys_destroyed"),
    ):
        assert issubclass(cls, OperationFailed)
        assert cls.code == code
        err = cls("boom", tenant_id=A, reason="r")
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is cls and again.fields == {"tenant_id": A, "reason": "r"}
    assert DecryptionFailed.http_status == 500


def test_providers_satisfy_the_protocol(provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATINOX_KEK", base64.b64encode(os.urandom(32)).decode())
    providers: list[KeyProvider] = [provider, EnvKeyProvider()]
    for p in providers:
        assert p.kek_version() >= 1
