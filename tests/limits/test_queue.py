"""The durable fair run queue: order, starvation, caps across claimers, leases."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest

from patinox.errors import ConcurrencyLimited
from patinox.limits import FairRunQueue
from patinox.storage import SqlBackend, utcnow
from patinox.tenancy import new_id

pytestmark = pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)


def _tenant(backend: SqlBackend, name: str) -> str:
    tid = new_id("tn")
    now = utcnow()
    backend.insert_tenant(
        {
            "id": tid,
            "name": name,
            "plan": "free",
            "state": "active",
            "isolation_level": "namespace",
            "storage_model": "pool",
            "limit_overrides": {},
            "created_at": now,
            "updated_at": now,
            "deleted_at": None,
        }
    )
    return tid


def _enqueue(
    q: FairRunQueue, tid: str, n: int, *, weight: int = 1, cap: int = 1000, priority: int = 0
) -> None:
    for _ in range(n):
        q.enqueue(
            tid,
            new_id("run"),
            weight=weight,
            max_running=cap,
            reserved_tokens=10,
            quota_period="2026-01-01",
            priority=priority,
        )


def _drain(q: FairRunQueue, n: int) -> list[str]:
    order = []
    for _ in range(n):
        c = q.claim("w")
        assert c is not None
        order.append(c.tenant_id)
        q.release(c.tenant_id, c.run_id)
    return order


def test_one_run_tenant_waits_a_round_not_a_thousand(backend: SqlBackend) -> None:
    q = FairRunQueue(backend)
    heavy, light = _tenant(backend, "heavy"), _tenant(backend, "light")
    _enqueue(q, heavy, 1000)
    _drain(q, 10)  # the heavy tenant is being served
    _enqueue(q, light, 1)
    order = _drain(q, 5)
    assert light in order[:2], order


def test_weights_share_dispatches_in_proportion(backend: SqlBackend) -> None:
    q = FairRunQueue(backend)
    a, b = _tenant(backend, "a"), _tenant(backend, "b")
    _enqueue(q, a, 200, weight=1)
    _enqueue(q, b, 200, weight=4)
    order = _drain(q, 100)
    assert order.count(b) == pytest.approx(80, abs=2)
    assert order.count(a) == pytest.approx(20, abs=2)


def test_priority_tier_first_and_fixed_order(backend: SqlBackend) -> None:
    q = FairRunQueue(backend)
    a, b, c = _tenant(backend, "a"), _tenant(backend, "b"), _tenant(backend, "c")
    _enqueue(q, a, 2)
    _enqueue(q, b, 2)
    _enqueue(q, c, 1, priority=1)
    assert _drain(q, 5) == [c, a, b, a, b]


def _in_threads(target: Callable[[int], None], n: int) -> None:
    """Run ``target(0)`` ... ``target(n - 1)`` on ``n`` threads and wait for all."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_cap_is_kept_across_many_claimers(backend: SqlBackend) -> None:
    q = FairRunQueue(backend)
    a = _tenant(backend, "a")
    _enqueue(q, a, 20, cap=3)
    barrier = threading.Barrier(8)
    got: list[object] = []

    def claim(i: int) -> None:
        queue = FairRunQueue(backend)
        barrier.wait()
        while (c := queue.claim(f"w{i}")) is not None:
            got.append(c)

    _in_threads(claim, 8)
    assert len(got) == 3
    assert q.held(a) == 3


def test_sync_holds_and_queued_runs_share_the_cap(backend: SqlBackend) -> None:
    q = FairRunQueue(backend)
    a = _tenant(backend, "a")
    q.hold(a, "run_x", max_running=2, holder="api")
    _enqueue(q, a, 3, cap=2)
    assert q.claim("w") is not None
    assert q.claim("w") is None  # one sync hold + one claim = cap 2
    with pytest.raises(ConcurrencyLimited):
        q.hold(a, "run_y", max_running=2, holder="api")
    q.release(a, "run_x")
    assert q.claim("w") is not None


def test_concurrent_holds_admit_exactly_the_cap(backend: SqlBackend) -> None:
    """8 threads released together by a barrier, each holding 3 runs, cap 5: exactly 5 are
    admitted and 19 refused, with the count of runs in flight in every refusal."""
    a = _tenant(backend, "a")
    q = FairRunQueue(backend)
    q.hold(a, "run_warm", max_running=5, holder="api")  # the tenant's queue row exists
    q.release(a, "run_warm")
    barrier = threading.Barrier(8)
    admitted: list[str] = []
    refused: list[ConcurrencyLimited] = []

    def hold(i: int) -> None:
        queue = FairRunQueue(backend)
        barrier.wait(timeout=30)
        for j in range(3):
            try:
                queue.hold(a, f"run_{i}_{j}", max_running=5, holder=f"api{i}")
            except ConcurrencyLimited as err:
                refused.append(err)
            else:
                admitted.append(f"run_{i}_{j}")

    _in_threads(hold, 8)
    assert len(admitted) == 5
    assert len(refused) == 19
    assert {e.fields["in_flight"] for e in refused} == {5}
    assert q.held(a) == 5


def test_a_refused_hold_writes_nothing(backend: SqlBackend) -> None:
    a = _tenant(backend, "a")
    q = FairRunQueue(backend)
    q.hold(a, "run_1", max_running=1, holder="api")
    with pytest.raises(ConcurrencyLimited) as refused:
        q.hold(a, "run_2", max_running=1, holder="api")
    assert refused.value.fields == {
        "tenant_id": a,
        "limit": 1,
        "in_flight": 1,
        "retry_after_s": 1,
    }
    assert q.held(a) == 1
    q.release(a, "run_1")
    q.hold(a, "run_2", max_running=1, holder="api")  # the refused id was never stored
    assert q.held(a) == 1


def test_expired_lease_puts_the_run_back_in_its_place(backend: SqlBackend) -> None:
    """A worker that dies (its lease expires) loses no run: another worker gets it."""
    q = FairRunQueue(backend)
    a = _tenant(backend, "a")
    _enqueue(q, a, 2)
    first = q.claim("dead-worker", lease_s=30)
    assert first is not None
    assert q.requeue_expired(now=utcnow() + timedelta(seconds=31)) == (1, [])
    again = q.claim("live-worker")
    assert again is not None and again.run_id == first.run_id


def test_suspended_tenants_runs_wait(backend: SqlBackend) -> None:
    q = FairRunQueue(backend)
    a, b = _tenant(backend, "a"), _tenant(backend, "b")
    _enqueue(q, a, 1)
    _enqueue(q, b, 1)
    backend.update_tenant(a, {"state": "suspended"})
    c = q.claim("w")
    assert c is not None and c.tenant_id == b
    assert q.claim("w") is None
    assert q.depth(a) == 1


def test_a_tenant_with_room_is_not_stuck_behind_tenants_at_their_cap(backend: SqlBackend) -> None:
    """Five tenants at their cap with many queued runs ahead must not hide a sixth tenant's
    run from the workers (the candidate scan once looked at the first 16 runs only)."""
    q = FairRunQueue(backend)
    capped = [_tenant(backend, f"capped{i}") for i in range(5)]
    for tid in capped:
        _enqueue(q, tid, 40, cap=4, weight=16)  # dense tags: 80 of their runs sort ahead
    for _ in range(20):
        assert q.claim("w") is not None  # every capped tenant now holds 4
    light = _tenant(backend, "light")
    _enqueue(q, light, 1, priority=0)
    got = q.claim("w")
    assert got is not None and got.tenant_id == light


def test_a_reservation_beyond_32_bits_is_queued_and_claimed_whole(backend: SqlBackend) -> None:
    """The largest prompt with the largest tool-call limit reserves more than 2**31 tokens;
    the queue keeps the number exactly (64-bit column on PostgreSQL too)."""
    q = FairRunQueue(backend)
    tid = _tenant(backend, "big")
    q.enqueue(tid, new_id("run"), weight=1, max_running=1, reserved_tokens=5_000_300_001, quota_period="p")
    claim = q.claim("w")
    assert claim is not None and claim.reserved_tokens == 5_000_300_001


def test_a_claim_passes_over_the_tenants_its_process_may_not_admit(backend: SqlBackend) -> None:
    """A worker whose process is at its fair share for some tenants claims the next run of
    another tenant, however far behind in fair order, and learns the tenant's plan weight."""
    q = FairRunQueue(backend)
    busy = [_tenant(backend, f"busy{i}") for i in range(6)]
    for tid in busy:
        _enqueue(q, tid, 40, weight=16)  # 240 runs ahead in fair order
    light = _tenant(backend, "light")
    _enqueue(q, light, 1, weight=1)
    c = q.claim("w", skip=busy)
    assert c is not None and c.tenant_id == light
    assert c.weight == 1  # the "free" plan's weight
    assert q.claim("w", skip=[*busy, light]) is None
    c = q.claim("w")
    assert c is not None and c.tenant_id in busy
