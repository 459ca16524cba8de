"""One tenant's conversation threads (:class:`patinox.storage.ThreadRecords`): per tenant on
every storage model (on PostgreSQL as the application role, under row-level security),
messages sealed at rest, the cap drops the oldest, deleting a thread deletes its messages,
and a shredded tenant's messages cannot be read."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from patinox.control import TenantSpec
from patinox.errors import DecryptionFailed, NotFound, QuotaExceeded, TenantKeysDestroyed
from patinox.runtime import Runtime
from patinox.storage import TenantStore, Turn
from patinox.tenancy import StorageModel, TenantContext
from tests.conftest import ALL_DEPLOYMENTS, Deployment


def store_of(runtime: Runtime, deployment: Deployment, name: str) -> TenantStore:
    t = runtime.tenants.create(
        TenantSpec(name=name, storage_model=StorageModel(deployment.storage_model)), actor="test"
    )
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    return runtime.backend.tenant_store(ctx)


def turns(*texts: str) -> list[Turn]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


@pytest.mark.parametrize("deployment", ALL_DEPLOYMENTS, indirect=True)
def test_a_thread_and_its_messages_belong_to_one_tenant(runtime: Runtime, deployment: Deployment) -> None:
    a, b = store_of(runtime, deployment, "alpha"), store_of(runtime, deployment, "beta")
    thread = a.threads().create({"topic": "billing"})
    a.threads().append(thread["id"], turns("hello", "hi there"), keep=10, run_id="run_x")

    got = a.threads().get(thread["id"])
    assert (got["metadata"], got["messages"]) == ({"topic": "billing"}, 2)
    assert [(m["position"], m["role"], m["content"]) for m in a.threads().history(thread["id"])] == [
        (1, "user", "hello"),
        (2, "assistant", "hi there"),
    ]
    # B sees nothing of it, exactly as for an id never issued, and cannot write to it.
    for call in (
        lambda: b.threads().get(thread["id"]),
        lambda: b.threads().history(thread["id"]),
        lambda: b.threads().messages(thread["id"]),
        lambda: b.threads().delete(thread["id"]),
        lambda: b.threads().append(thread["id"], turns("intrude"), keep=10),
    ):
        with pytest.raises(NotFound) as foreign:
            call()
        assert foreign.value.code == "not_found"
    with pytest.raises(NotFound) as missing:
        b.threads().get("th_never_issued")
    assert type(missing.value) is type(foreign.value)
    assert b.threads().list_threads() == []
    assert b.bulk().count("thread_messages") == 0 and b.bulk().count("threads") == 0
    # A's thread is untouched by B's attempts.
    assert a.threads().get(thread["id"])["messages"] == 2


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool", "pg-bridge"], indirect=True)
def test_deleting_a_thread_deletes_its_messages(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    kept, gone = store.threads().create({}), store.threads().create({})
    store.threads().append(kept["id"], turns("k1", "k2"), keep=10)
    store.threads().append(gone["id"], turns("g1", "g2", "g3"), keep=10)
    assert store.threads().delete(gone["id"]) == 3
    with pytest.raises(NotFound):
        store.threads().get(gone["id"])
    with pytest.raises(NotFound):
        store.threads().delete(gone["id"])
    assert store.bulk().count("thread_messages") == 2
    assert [m["content"] for m in store.threads().history(kept["id"])] == ["k1", "k2"]


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_the_cap_keeps_the_newest_messages(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    thread = store.threads().create({})
    for n in range(5):
        store.threads().append(thread["id"], turns(f"q{n}", f"a{n}"), keep=4)
    history = store.threads().history(thread["id"])
    assert [(m["position"], m["content"]) for m in history] == [(7, "q3"), (8, "a3"), (9, "q4"), (10, "a4")]
    assert store.bulk().count("thread_messages") == 4


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_concurrent_appends_to_one_thread_keep_every_message_in_order(
    runtime: Runtime, deployment: Deployment
) -> None:
    store = store_of(runtime, deployment, "alpha")
    thread = store.threads().create({})
    n = 6
    start = threading.Barrier(n)

    def append(i: int) -> None:
        records = store.threads()
        start.wait()  # every append reaches its numbering together
        records.append(thread["id"], turns(f"q{i}", f"a{i}"), keep=100)

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(append, range(n)))
    history = store.threads().history(thread["id"])
    assert [m["position"] for m in history] == list(range(1, 2 * n + 1))
    # Each run's two messages are adjacent: one append's numbering is never interleaved.
    for first, second in zip(history[::2], history[1::2], strict=True):
        assert (first["content"][1:], first["role"], second["role"]) == (
            second["content"][1:],
            "user",
            "assistant",
        )


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_messages_page_oldest_first(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    thread = store.threads().create({})
    store.threads().append(thread["id"], turns("m1", "m2", "m3", "m4", "m5"), keep=10)
    first = store.threads().messages(thread["id"], limit=2)
    second = store.threads().messages(thread["id"], limit=2, after=first[-1]["id"])
    third = store.threads().messages(thread["id"], limit=2, after=second[-1]["id"])
    assert [m["content"] for m in first + second + third] == ["m1", "m2", "m3", "m4", "m5"]
    with pytest.raises(NotFound):
        store.threads().messages(thread["id"], after="msg_not_in_it")
    older = [store.threads().create({}) for _ in range(3)]
    page = store.threads().list_threads(limit=2)
    rest = store.threads().list_threads(limit=2, before=page[-1]["id"])
    assert [t["id"] for t in page + rest] == [t["id"] for t in reversed([thread, *older])]


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool", "pg-silo"], indirect=True)
def test_messages_and_metadata_are_sealed_at_rest(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    secret, meta = "thread-content-secret-marker", "thread-metadata-secret-marker"
    thread = store.threads().create({"customer": meta})
    store.threads().append(thread["id"], turns(secret), keep=10)
    (stored,) = [row for page in store.bulk().pages("thread_messages") for row in page]
    assert isinstance(stored["content"], bytes) and secret.encode() not in stored["content"]
    (stored_thread,) = [row for page in store.bulk().pages("threads") for row in page]
    assert isinstance(stored_thread["metadata"], bytes) and meta.encode() not in stored_thread["metadata"]
    (opened,) = [row for page in store.bulk().pages("thread_messages", opened=True) for row in page]
    assert opened["content"] == secret


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_a_shredded_tenants_messages_cannot_be_read(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    thread = store.threads().create({})
    store.threads().append(thread["id"], turns("before the shred"), keep=10)
    runtime.backend.keyring.shred(store.tenant_id)
    with pytest.raises((TenantKeysDestroyed, DecryptionFailed)):
        store.threads().history(thread["id"])
    with pytest.raises(TenantKeysDestroyed):
        store.threads().append(thread["id"], turns("after"), keep=10)


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-bridge"], indirect=True)
def test_a_dek_rotation_reseals_messages_and_metadata(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    thread = store.threads().create({"k": "v"})
    store.threads().append(thread["id"], turns("hello", "hi"), keep=10)
    old = {row["id"]: row["content"] for page in store.bulk().pages("thread_messages") for row in page}
    runtime.backend.keyring.rotate_dek(store.tenant_id)
    assert store.reencrypt() == 3  # two messages and the thread's metadata
    new = {row["id"]: row["content"] for page in store.bulk().pages("thread_messages") for row in page}
    assert new.keys() == old.keys() and all(new[k] != old[k] for k in old)
    assert [m["content"] for m in store.threads().history(thread["id"])] == ["hello", "hi"]
    assert store.threads().get(thread["id"])["metadata"] == {"k": "v"}


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_concurrent_creators_never_pass_the_thread_limit(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    n, limit = 8, 3
    start = threading.Barrier(n)

    def create(_: int) -> str:
        records = store.threads()
        start.wait()  # every creator reaches its insert together
        try:
            records.create({}, limit=limit)
        except QuotaExceeded as err:
            assert (err.fields["quota"], err.fields["limit"]) == ("max_threads", limit)
            return "refused"
        return "created"

    with ThreadPoolExecutor(n) as pool:
        outcomes = sorted(pool.map(create, range(n)))
    assert outcomes == ["created"] * limit + ["refused"] * (n - limit)
    assert store.bulk().count("threads") == limit
