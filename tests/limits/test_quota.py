"""The durable daily token budget: reserve-then-settle, exact under concurrency."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from patinox.errors import ExceedsBudget, QuotaExceeded
from patinox.limits import RUNS_PER_DAY, TokenBudget
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
    assert b.today() == "2026-01-02" and b.spent_today("tn_a") == (0, 100)
    assert b.spent_in("tn_a", "2026-01-01") == (90, 0) and b.spent_in("tn_a", "2025-12-31") == (0, 0)


def test_a_run_reserved_before_midnight_settles_to_its_own_day(backend: SqlBackend) -> None:
    now = [datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC)]
    b = TokenBudget(backend, clock=lambda: now[0])
    reservation = b.reserve("tn_a", 50, limit=100)
    now[0] += timedelta(seconds=2)
    b.settle(reservation, 30)
    assert b.spent_in("tn_a", "2026-01-01") == (30, 0) and b.spent_today("tn_a") == (0, 0)


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


@pytest.mark.parametrize(
    ("now", "retry_after_s"),
    [
        (datetime(2026, 1, 1, 23, 59, 58, 700_000, tzinfo=UTC), 2),  # 1.3 s to midnight
        (datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC), 1),
        (datetime(2026, 1, 1, 23, 59, 59, 999_999, tzinfo=UTC), 1),
        (datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC), 86_400),
    ],
)
def test_retry_after_is_rounded_up_to_the_reset(
    backend: SqlBackend, now: datetime, retry_after_s: int
) -> None:
    """At 23:59:58.7 the refusal said 1 s (``int()`` of 1.3 s): a retry then was refused
    again. A retry after ``retry_after_s`` always falls in the next day."""
    b = TokenBudget(backend, clock=lambda: now)
    b.reserve("tn_a", 100, limit=100)
    with pytest.raises(QuotaExceeded) as ei:
        b.reserve("tn_a", 1, limit=100)
    assert ei.value.retry_after_s == retry_after_s
    b.consume("tn_a", RUNS_PER_DAY, 1, 1)
    with pytest.raises(QuotaExceeded) as ei:
        b.consume("tn_a", RUNS_PER_DAY, 1, 1)
    assert ei.value.retry_after_s == retry_after_s


def test_a_reservation_larger_than_the_whole_budget_is_refused_for_good(backend: SqlBackend) -> None:
    """A run whose worst case exceeds the whole daily budget was refused as if it could
    run tomorrow (``quota_exceeded`` with a ``retry_after_s`` of hours); no day ever
    admits it. It is ``ExceedsBudget``, with no retry time, and nothing is held."""
    b = TokenBudget(backend)
    with pytest.raises(ExceedsBudget) as ei:
        b.reserve("tn_a", 101, limit=100)
    assert (ei.value.limit, ei.value.requested) == (100, 101)
    assert "retry_after_s" not in ei.value.fields and ei.value.http_status == 422
    assert b.spent_today("tn_a") == (0, 0)
    b.reserve("tn_a", 100, limit=100)  # the whole budget, exactly, is admitted
