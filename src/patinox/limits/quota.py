"""Per-tenant daily model-token budget with reserve-then-settle, durable across processes.

Before a run, its worst case (see :func:`patinox.control.runs.worst_case_tokens`) is
*reserved*; the run is refused if spent + reserved + this reservation would pass the
day's budget, so a refused run never reaches the model. After the run, the reservation is
*settled* to the tokens actually used. The day is the UTC calendar day.

The counters live in the ``quota_ledger`` table of the shared database, one row per
tenant, quota and period, changed only by conditional ``UPDATE`` statements
(``... SET reserved = reserved + n WHERE spent + reserved + n <= limit``): each is atomic
on PostgreSQL and SQLite alike, so any number of API and worker processes never overbook.
A process that dies between reserve and settle leaves its reservation held until the
period ends (the budget errs on the side of refusing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import Connection, select, update

from patinox.errors import QuotaExceeded
from patinox.storage import SqlBackend
from patinox.storage import _schema as s

TOKENS_PER_DAY = "tokens_per_day"
RUNS_PER_DAY = "runs_per_day"


def day_start(now: datetime) -> datetime:
    """Midnight UTC of ``now``'s day."""
    return datetime.combine(now.astimezone(UTC).date(), time(0), tzinfo=UTC)


@dataclass
class Reservation:
    """Tokens held for one run until :meth:`TokenBudget.settle`."""

    tenant_id: str
    period: str
    tokens: int
    settled: bool = False


class TokenBudget:
    """Reserve/settle accounting of model tokens per tenant per UTC day (durable).

    Args:
        backend: the shared database holding ``quota_ledger``.
        clock: returns now (UTC); injectable for tests.
    """

    def __init__(self, backend: SqlBackend, clock: Callable[[], datetime] | None = None) -> None:
        self._backend = backend
        self._clock = clock or (lambda: datetime.now(UTC))

    def _period(self) -> tuple[str, datetime]:
        now = self._clock().astimezone(UTC)
        return now.date().isoformat(), now

    def _ensure_row(self, conn: object, tenant_id: str, period: str, quota: str = TOKENS_PER_DAY) -> None:
        ledger = s.quota_ledger
        values = {
            "tenant_id": tenant_id,
            "quota": quota,
            "period": period,
            "spent": 0,
            "reserved": 0,
        }
        if self._backend.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt: Any = pg_insert(ledger).values(**values).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(ledger).values(**values).on_conflict_do_nothing()
        conn.execute(stmt)  # type: ignore[attr-defined]

    def _where(self, tenant_id: str, period: str, quota: str = TOKENS_PER_DAY) -> list[object]:
        ledger = s.quota_ledger
        return [ledger.c.tenant_id == tenant_id, ledger.c.quota == quota, ledger.c.period == period]

    def consume(
        self, tenant_id: str, quota: str, amount: int, limit: int, *, conn: Connection | None = None
    ) -> None:
        """Count ``amount`` against today's ``quota`` at once (no reservation), e.g. one run
        against ``runs_per_day``.

        Raises:
            QuotaExceeded: the quota's ``limit`` would be passed; nothing was counted.
        """
        ledger = s.quota_ledger
        period, now = self._period()
        where = self._where(tenant_id, period, quota)
        take = (
            update(ledger)
            .where(*where)  # type: ignore[arg-type]
            .where(ledger.c.spent + ledger.c.reserved + amount <= limit)
            .values(spent=ledger.c.spent + amount)
        )
        with self._backend.control_tx(conn) as conn:
            if conn.execute(take).rowcount == 1:
                return
            self._ensure_row(conn, tenant_id, period, quota)
            if conn.execute(take).rowcount == 1:
                return
            spent = conn.execute(select(ledger.c.spent).where(*where)).scalar_one()  # type: ignore[arg-type]
        reset = day_start(now) + timedelta(days=1)
        raise QuotaExceeded(
            f"daily quota {quota} of {limit} reached",
            tenant_id=tenant_id,
            quota=quota,
            limit=limit,
            used=int(spent),
            requested=amount,
            reset_at=reset.isoformat(),
            retry_after_s=max(1, int((reset - now).total_seconds())),
        )

    def reserve(
        self, tenant_id: str, tokens: int, limit: int, *, conn: Connection | None = None
    ) -> Reservation:
        """Hold ``tokens`` of today's ``limit`` for one run.

        Raises:
            QuotaExceeded: spent + reserved + ``tokens`` > ``limit``; fields give the limit,
                usage, request and the reset time (next midnight UTC).
        """
        ledger = s.quota_ledger
        period, now = self._period()
        with self._backend.control_tx(conn) as conn:
            self._ensure_row(conn, tenant_id, period)
            n = conn.execute(
                update(ledger)
                .where(*self._where(tenant_id, period))  # type: ignore[arg-type]
                .where(ledger.c.spent + ledger.c.reserved + tokens <= limit)
                .values(reserved=ledger.c.reserved + tokens)
            ).rowcount
            if n == 1:
                return Reservation(tenant_id, period, tokens)
            spent, reserved = conn.execute(
                select(ledger.c.spent, ledger.c.reserved).where(*self._where(tenant_id, period))  # type: ignore[arg-type]
            ).one()
        reset = day_start(now) + timedelta(days=1)
        raise QuotaExceeded(
            f"daily token budget of {limit} would be exceeded",
            tenant_id=tenant_id,
            quota=TOKENS_PER_DAY,
            limit=limit,
            used=int(spent),
            reserved=int(reserved),
            requested=tokens,
            reset_at=reset.isoformat(),
            retry_after_s=max(1, int((reset - now).total_seconds())),
        )

    def settle(self, reservation: Reservation, used: int, *, conn: Connection | None = None) -> None:
        """Replace the reservation by ``used`` tokens (idempotent per object)."""
        if reservation.settled:
            return
        reservation.settled = True
        self.settle_tokens(reservation.tenant_id, reservation.period, reservation.tokens, used, conn=conn)

    def settle_tokens(
        self, tenant_id: str, period: str, reserved: int, used: int, *, conn: Connection | None = None
    ) -> None:
        """Settle a reservation known only by its numbers (a worker settling an API
        process's reservation of a queued run)."""
        ledger = s.quota_ledger
        with self._backend.control_tx(conn) as conn:
            conn.execute(
                update(ledger)
                .where(*self._where(tenant_id, period))  # type: ignore[arg-type]
                .values(reserved=ledger.c.reserved - reserved, spent=ledger.c.spent + used)
            )

    def spent_today(self, tenant_id: str) -> tuple[int, int]:
        """(spent, reserved) tokens of ``tenant_id`` today."""
        ledger = s.quota_ledger
        period, _ = self._period()
        with self._backend._tx() as conn:
            row = conn.execute(
                select(ledger.c.spent, ledger.c.reserved).where(*self._where(tenant_id, period))  # type: ignore[arg-type]
            ).first()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))
