"""Per-tenant daily model-token budget with reserve-then-settle.

Before a run, its worst case (estimated input tokens + the output tokens it may produce)
is *reserved*; the run is refused if spent + reserved + this reservation would pass the
day's budget, so a refused run never reaches the model. After the run, the reservation is
*settled* to the tokens actually used. The day is the UTC calendar day. Spent tokens are
read from durable usage records the first time a tenant is seen each day, so a restart
keeps the count; reservations in flight are process-local in this build.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from patinox.errors import QuotaExceeded

#: ``(tenant_id, since) -> tokens already recorded since then``
UsageLoader = Callable[[str, datetime], int]


def day_start(now: datetime) -> datetime:
    """Midnight UTC of ``now``'s day."""
    return datetime.combine(now.astimezone(UTC).date(), time(0), tzinfo=UTC)


@dataclass
class _Ledger:
    day: date
    spent: int
    reserved: int


@dataclass
class Reservation:
    """Tokens held for one run until :meth:`TokenBudget.settle`."""

    tenant_id: str
    tokens: int
    ledger: _Ledger
    settled: bool = False


class TokenBudget:
    """Reserve/settle accounting of model tokens per tenant per UTC day.

    Args:
        load_spent: reads tokens already recorded for a tenant since a time (durable source).
        clock: returns now (UTC); injectable for tests.
    """

    def __init__(self, load_spent: UsageLoader, clock: Callable[[], datetime] | None = None) -> None:
        self._load = load_spent
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._ledgers: dict[str, _Ledger] = {}

    def _ledger(self, tenant_id: str, now: datetime) -> _Ledger:
        led = self._ledgers.get(tenant_id)
        if led is None or led.day != now.date():
            led = _Ledger(now.date(), self._load(tenant_id, day_start(now)), 0)
            self._ledgers[tenant_id] = led
        return led

    def reserve(self, tenant_id: str, tokens: int, limit: int) -> Reservation:
        """Hold ``tokens`` of today's ``limit`` for one run.

        Raises:
            QuotaExceeded: spent + reserved + ``tokens`` > ``limit``; fields give the limit,
                usage, request and the reset time (next midnight UTC).
        """
        now = self._clock().astimezone(UTC)
        with self._lock:
            led = self._ledger(tenant_id, now)
            if led.spent + led.reserved + tokens > limit:
                reset = day_start(now) + timedelta(days=1)
                raise QuotaExceeded(
                    f"daily token budget of {limit} would be exceeded",
                    tenant_id=tenant_id,
                    quota="tokens_per_day",
                    limit=limit,
                    used=led.spent,
                    reserved=led.reserved,
                    requested=tokens,
                    reset_at=reset.isoformat(),
                    retry_after_s=max(1, int((reset - now).total_seconds())),
                )
            led.reserved += tokens
        return Reservation(tenant_id, tokens, led)

    def settle(self, reservation: Reservation, used: int) -> None:
        """Replace the reservation by ``used`` tokens (idempotent)."""
        with self._lock:
            if reservation.settled:
                return
            reservation.settled = True
            led = reservation.ledger
            led.reserved -= reservation.tokens
            # A ledger replaced since (new day, or forgotten) was reloaded from durable
            # usage records, which hold this run once it is settled in storage.
            if self._ledgers.get(reservation.tenant_id) is led:
                led.spent += used

    def spent_today(self, tenant_id: str) -> tuple[int, int]:
        """(spent, reserved) tokens of ``tenant_id`` today."""
        now = self._clock().astimezone(UTC)
        with self._lock:
            led = self._ledger(tenant_id, now)
            return led.spent, led.reserved

    def forget(self, tenant_id: str) -> None:
        """Drop the tenant's ledger (suspend, delete, or a limit change)."""
        with self._lock:
            self._ledgers.pop(tenant_id, None)
