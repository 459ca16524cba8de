"""Bulk access to a tenant's rows (export, import, moves) is scoped and sealed by storage itself."""

from __future__ import annotations

import pytest

from patinox.errors import DecryptionFailed
from patinox.storage import SqlBackend
from patinox.tenancy import new_id
from tests._contexts import tenant_context

MARK = "bulk-plaintext-marker"


def _fill(backend: SqlBackend, tenant_id: str, n: int) -> None:
    store = backend.tenant_store(tenant_context(tenant_id, plan="pro"))
    for i in range(n):
        store.memory_put(f"k{i:04d}", f"{MARK} {tenant_id} {i}")


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_reads_counts_and_deletes_see_only_the_bound_tenant(backend: SqlBackend) -> None:
    a, b = new_id("tn"), new_id("tn")
    _fill(backend, a, 3)
    _fill(backend, b, 2)
    rows_a = backend.tenant_store(tenant_context(a)).bulk()
    rows_b = backend.tenant_store(tenant_context(b)).bulk()

    assert rows_a.count("memory") == 3 and rows_b.count("memory") == 2
    (page,) = list(rows_a.pages("memory", opened=True))
    assert [r["key"] for r in page] == ["k0000", "k0001", "k0002"]
    assert {r["tenant_id"] for r in page} == {a}
    assert [r["value"] for r in page] == [f"{MARK} {a} {i}" for i in range(3)]
    (stored,) = list(rows_a.pages("memory"))
    assert all(isinstance(r["value"], bytes) and MARK.encode() not in r["value"] for r in stored)

    assert rows_b.delete_all(["memory"]) == {"memory": 2}
    assert rows_b.count("memory") == 0 and list(rows_b.pages("memory")) == []
    assert rows_a.count("memory") == 3


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_inserts_are_written_as_the_bound_tenant_and_sealed_by_storage(backend: SqlBackend) -> None:
    a, b = new_id("tn"), new_id("tn")
    _fill(backend, a, 2)
    store_a = backend.tenant_store(tenant_context(a))
    store_b = backend.tenant_store(tenant_context(b))
    (opened,) = list(store_a.bulk().pages("memory", opened=True))

    # Rows that still name tenant A are written as B's, and their plaintext sealed for B.
    assert store_b.bulk().insert("memory", opened, seal=True) == 2
    assert store_a.bulk().count("memory") == 2
    assert [store_b.memory_get(k) for k in ("k0000", "k0001")] == [f"{MARK} {a} 0", f"{MARK} {a} 1"]

    # Ciphertext copied as stored into another tenant does not open there (the AAD names
    # the tenant): storage copies ciphertext only within one tenant.
    c = new_id("tn")
    store_c = backend.tenant_store(tenant_context(c))
    store_c.memory_put("own", "its own DEK")
    (stored,) = list(store_a.bulk().pages("memory"))
    store_c.bulk().insert("memory", stored)
    with pytest.raises(DecryptionFailed):
        store_c.memory_get("k0000")


def test_pages_walk_every_row_once_in_key_order(backend: SqlBackend) -> None:
    a = new_id("tn")
    _fill(backend, a, 1203)  # three pages of 500, the last one short
    rows = backend.tenant_store(tenant_context(a)).bulk()
    pages = list(rows.pages("memory"))
    assert [len(p) for p in pages] == [500, 500, 203]
    keys = [r["key"] for p in pages for r in p]
    assert keys == sorted(keys) and len(set(keys)) == 1203
    n, digest = rows.fingerprint("memory")
    assert n == 1203 and rows.fingerprint("memory") == (n, digest)
