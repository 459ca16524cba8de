"""Reserve/settle accounting of the daily token budget."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from patinox.errors import ConcurrencyLimited, QuotaExceeded
from patinox.limits import ConcurrencyLimiter, TokenBudget


def test_reserve_refuses_over_budget_and_settles_to_actual() -> None:
    b = TokenBudget(lambda tid, since: 0)
    r1 = b.reserve("t", 60, limit=100)
    with pytest.raises(QuotaExceeded) as ei:
        b.reserve("t", 50, limit=100)
    assert ei.value.reserved == 60 and ei.value.requested == 50
    b.settle(r1, 20)
    b.settle(r1, 20)  # idempotent
    assert b.spent_today("t") == (20, 0)
    b.reserve("t", 80, limit=100)
    assert b.spent_today("t") == (20, 80)


def test_loads_durable_usage_once_per_day() -> None:
    calls: list[datetime] = []
    now = [datetime(2026, 1, 1, 23, 59, tzinfo=UTC)]

    def load(tid: str, since: datetime) -> int:
        calls.append(since)
        return 90

    b = TokenBudget(load, clock=lambda: now[0])
    with pytest.raises(QuotaExceeded) as ei:
        b.reserve("t", 20, limit=100)
    assert ei.value.reset_at == "2026-01-02T00:00:00+00:00"
    b.reserve("t", 10, limit=100)
    assert len(calls) == 1
    now[0] += timedelta(minutes=2)  # a new UTC day
    b.reserve("t", 10, limit=100)
    assert calls[-1] == datetime(2026, 1, 2, tzinfo=UTC)


def test_concurrent_reservations_never_overbook() -> None:
    b = TokenBudget(lambda tid, since: 0)
    barrier = threading.Barrier(8)
    won: list[int] = []

    def go() -> None:
        barrier.wait()
        try:
            b.reserve("t", 30, limit=100)
            won.append(1)
        except QuotaExceeded:
            pass

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 3


def test_concurrency_limiter_exact_under_contention() -> None:
    lim = ConcurrencyLimiter()
    barrier = threading.Barrier(10)
    slots = []
    refused = []

    def go() -> None:
        barrier.wait()
        try:
            slots.append(lim.acquire("t", 4))
        except ConcurrencyLimited:
            refused.append(1)

    threads = [threading.Thread(target=go) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(slots) == 4 and len(refused) == 6
    for s in slots:
        s.release()
        s.release()
    assert lim.in_flight("t") == 0
