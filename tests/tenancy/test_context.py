"""Tenant context: immutability, fail-closed, scopes that restore, explicit thread propagation."""

from __future__ import annotations

import asyncio
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from patinox.errors import (
    PermissionDenied,
    RateLimited,
    TenantContextAlreadySet,
    TenantContextMissing,
)
from patinox.tenancy import (
    TenantContext,
    TenantThreadPoolExecutor,
    current_tenant,
    current_tenant_or_none,
    run_in_thread,
    tenant_scope,
)
from tests._contexts import tenant_context


def ctx(tid: str) -> TenantContext:
    return tenant_context(tid)


def test_no_context_fails_closed() -> None:
    with pytest.raises(TenantContextMissing):
        current_tenant()
    assert current_tenant_or_none() is None


def test_scope_sets_and_restores() -> None:
    with tenant_scope(ctx("tn_a")) as c:
        assert current_tenant() is c
    assert current_tenant_or_none() is None


def test_scope_restores_after_exception() -> None:
    with pytest.raises(ValueError), tenant_scope(ctx("tn_a")):
        raise ValueError("boom")
    assert current_tenant_or_none() is None


def test_nested_scope_is_an_error() -> None:
    with (
        tenant_scope(ctx("tn_a")),
        pytest.raises(TenantContextAlreadySet),
        tenant_scope(ctx("tn_b")),
    ):
        pass


def test_context_is_immutable() -> None:
    c = ctx("tn_a")
    with pytest.raises(ValidationError):
        c.tenant_id = "tn_b"  # type: ignore[misc]


def test_require_scope() -> None:
    c = ctx("tn_a")
    c.require_scope("read")
    with pytest.raises(PermissionDenied):
        c.require_scope("runs:write")


def test_wire_round_trip() -> None:
    c = ctx("tn_a")
    assert TenantContext.from_wire(c.to_wire()) == c


def test_plain_thread_pool_does_not_see_tenant_but_ours_does() -> None:
    """A plain pool thread has no tenant (fails closed); the tenant pool copies it explicitly."""
    with ThreadPoolExecutor(1) as plain, TenantThreadPoolExecutor(1) as ours:
        with tenant_scope(ctx("tn_a")):
            assert plain.submit(current_tenant_or_none).result() is None
            assert ours.submit(lambda: current_tenant().tenant_id).result() == "tn_a"
            assert run_in_thread(plain, lambda: current_tenant().tenant_id).result() == "tn_a"
        # The same worker threads, reused after the scope: no stale tenant.
        assert ours.submit(current_tenant_or_none).result() is None
        with tenant_scope(ctx("tn_b")):
            assert ours.submit(lambda: current_tenant().tenant_id).result() == "tn_b"


def test_interleaved_threads_keep_their_own_tenant() -> None:
    """Two submitters alternate on one worker thread; each task sees its submitter's tenant."""
    barrier = threading.Barrier(2)
    seen: dict[str, list[str]] = {"tn_a": [], "tn_b": []}
    pool = TenantThreadPoolExecutor(1)

    def submitter(tid: str) -> None:
        with tenant_scope(ctx(tid)):
            for _ in range(20):
                barrier.wait()
                seen[tid].append(pool.submit(lambda: current_tenant().tenant_id).result())

    threads = [threading.Thread(target=submitter, args=(t,)) for t in ("tn_a", "tn_b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.shutdown()
    assert seen == {"tn_a": ["tn_a"] * 20, "tn_b": ["tn_b"] * 20}


async def test_asyncio_tasks_inherit_and_do_not_leak() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def in_scope(tid: str) -> str:
        with tenant_scope(ctx(tid)):
            started.set()
            await release.wait()
            return current_tenant().tenant_id

    t1 = asyncio.create_task(in_scope("tn_a"))
    await started.wait()
    # The other task's scope is not ours.
    assert current_tenant_or_none() is None
    t2 = asyncio.create_task(in_scope("tn_b"))
    await asyncio.sleep(0)
    release.set()
    assert await t1 == "tn_a"
    assert await t2 == "tn_b"


def test_errors_survive_pickling_with_fields() -> None:
    err = RateLimited("slow down", tenant_id="tn_a", retry_after_s=3, limit=10)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is RateLimited
    assert back.retry_after_s == 3
    assert back.fields == err.fields
    assert back.message == "slow down"


def _tenant_row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": "t_abc",
        "plan": "pro",
        "limit_overrides": {"requests_per_minute": 7},
        "isolation_level": "namespace",
        "storage_model": "bridge",
        "moving_to": None,
    }
    row.update(changes)
    return row


def test_for_tenant_builds_the_whole_context_from_a_row() -> None:
    ctx = TenantContext.for_tenant(_tenant_row(), principal="k_1", scopes=["read", "read"])
    assert (ctx.tenant_id, ctx.principal, ctx.scopes, ctx.plan) == (
        "t_abc",
        "k_1",
        frozenset({"read"}),
        "pro",
    )
    assert ctx.limits.requests_per_minute == 7
    assert ctx.storage_model.value == "bridge"
    assert ctx.writes_held is False


def test_for_tenant_holds_writes_of_a_moving_tenant_and_of_a_row_that_cannot_say() -> None:
    assert TenantContext.for_tenant(_tenant_row(moving_to="silo"), principal="k", scopes=()).writes_held
    row = _tenant_row()
    del row["moving_to"]
    assert TenantContext.for_tenant(row, principal="k", scopes=()).writes_held
