"""The durable daily token budget: reserve-then-settle, exact under concurrency."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from patinox.errors import QuotaExceeded
from patinox.limits import TokenBudget
from patinox.storage import SqlBackend

pytestmark = pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)


def test_reserve_refuses_over_budget_and_settles_to_actual(backend: SqlBackend) -> None:
    b = TokenBudget(backend)
    r1 = b.reserve("tn_a", 60, limit=100)
    with pytest.raises(QuotaExceeded) as ei:
        b.reserve("tn_a", 50, limit=100)
    assert ei.value.reserved == 60 and ei.value.requested == 50
    b.settle(r1, 20)
    b.settle(r1, 20)  # idempotent
    assert b.spent_today("tn_a") == (20, 0)
    b.reserve("tn_a", 80, limit=100)
    assert b.spent_today("tn_a") == (20, 80)
    assert b.spent_today("tn_b") == (0, 0)


def test_counters_survive_a_new_budget_object(backend: SqlBackend) -> None:
    """A restarted (or another) process sees the same counters."""
    TokenBudget(backend).settle(TokenBudget(backend).reserve("tn_a", 70, limit=100), 70)
    with pytest.raises(QuotaExceeded) as ei:
        TokenBudget(backend).reserve("tn_a", 31, limit=100)
    assert ei.value.used == 70


def test_the_day_rolls_over_at_midnight_utc(backend: SqlBackend) -> None:
    now = [datetime(2026, 1, 1, 23, 59, tzinfo=UTC)]
    b = TokenBudget(backend, clock=lambda: now[0])
    b.settle(b.reserve("tn_a", 90, limit=100), 90)
    with pytest.raises(QuotaExceeded) as ei:
        b.reserve("tn_a", 20, limit=100)
    assert ei.value.reset_at == "2026-01-02T00:00:00+00:00"
    now[0] += timedelta(minutes=2)
    b.reserve("tn_a", 100, limit=100)


def test_concurrent_reservations_never_overbook(backend: SqlBackend) -> None:
    budgets = [TokenBudget(backend) for _ in range(8)]
    barrier = threading.Barrier(8)
    won: list[int] = []

    def go(i: int) -> None:
        barrier.wait()
        try:
            budgets[i].reserve("tn_a", 30, limit=100)
            won.append(1)
        except QuotaExceeded:
            pass

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 3
    assert budgets[0].spent_today("tn_a") == (0, 90)
