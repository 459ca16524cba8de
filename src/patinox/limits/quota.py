"""Per-tenant daily model-token budget with reserve-then-settle, durable across processes.

Before a run, its worst case (see :func:`patinox.control.runs.worst_case_tokens`) is
*reserved*; the run is refused if spent + reserved + this reservation would pass the
day's budget, so a refused run never reaches the model. After the run, the reservation is
*settled* to the tokens actually used. The day is the UTC calendar day.

The counters live in the ``quota_ledger`` table of the shared database, one row per
tenant, quota and period, changed only by conditional ``UPDATE`` statements
(``... SET reserved = reserved + n WHERE spent + reserved + n <= limit``): each is atomic
on PostgreSQL and SQLite alike, so any number of API and worker processes never overbook.
A process that dies between reserve and settle leaves its reservation to whoever takes
over the run: a queued run goes back to the queue with it, and the reaper of an expired
synchronous hold settles it (charging the whole reservation when what the run used is
unknown: the budget errs on the side of refusing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import BigInteger, Connection, and_, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from patinox.errors import ExceedsBudget, QuotaExceeded
from patinox.storage import SqlBackend, execute_write
from patinox.storage import schema as s

TOKENS_PER_DAY = "tokens_per_day"
RUNS_PER_DAY = "runs_per_day"

# The ledger's statements, built once (every run executes several; building a statement
# costs several times executing a prebuilt one). Parameters: q_tenant, q_quota, q_period,
# and q_amount / q_limit / q_reserved / q_used.
_L = s.quota_ledger
_ROW = and_(
    _L.c.tenant_id == bindparam("q_tenant"),
    _L.c.quota == bindparam("q_quota"),
    _L.c.period == bindparam("q_period"),
)
_AMOUNT = bindparam("q_amount", type_=BigInteger)
_FITS = _L.c.spent + _L.c.reserved + _AMOUNT <= bindparam("q_limit", type_=BigInteger)
#: Count an amount as spent at once, if it fits (consume).
_TAKE_SPENT = update(_L).where(_ROW, _FITS).values(spent=_L.c.spent + _AMOUNT)
#: Hold an amount as reserved, if it fits (reserve).
_TAKE_RESERVED = update(_L).where(_ROW, _FITS).values(reserved=_L.c.reserved + _AMOUNT)
#: Uncount an amount counted by consume, unconditionally (give_back).
_GIVE_BACK = update(_L).where(_ROW).values(spent=_L.c.spent - _AMOUNT)
_SETTLE = (
    update(_L)
    .where(_ROW)
    .values(
        reserved=_L.c.reserved - bindparam("q_reserved", type_=BigInteger),
        spent=_L.c.spent + bindparam("q_used", type_=BigInteger),
    )
)
_READ = select(_L.c.spent, _L.c.reserved).where(_ROW)
#: Create a period's row with zero counters unless it exists, per dialect.
_ENSURE = {
    "postgresql": pg_insert(_L).on_conflict_do_nothing(),
    "sqlite": sqlite_insert(_L).on_conflict_do_nothing(),
}


def day_start(now: datetime) -> datetime:
    """Midnight UTC of ``now``'s day."""
    return datetime.combine(now.astimezone(UTC).date(), time(0), tzinfo=UTC)


def _seconds_until(reset: datetime, now: datetime) -> int:
    """Whole seconds from ``now`` to ``reset``, rounded up (at least 1): a retry after them
    falls at or after ``reset``, never just before it."""
    return max(1, math.ceil((reset - now).total_seconds()))


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

    @staticmethod
    def _ensure_row(conn: Connection, key: dict[str, str]) -> None:
        row = {"tenant_id": key["q_tenant"], "quota": key["q_quota"], "period": key["q_period"]}
        execute_write(conn, _ENSURE[conn.dialect.name], {**row, "spent": 0, "reserved": 0})

    @staticmethod
    def _key(tenant_id: str, period: str, quota: str = TOKENS_PER_DAY) -> dict[str, str]:
        """The ledger row's key, as parameters of the statements above (and as columns)."""
        return {"q_tenant": tenant_id, "q_quota": quota, "q_period": period}

    def _take(
        self, conn: Connection, take: Any, key: dict[str, str], amount: int, limit: int
    ) -> tuple[int, int] | None:
        """Apply a conditional take; ``None`` when it fitted, else the row's (spent, reserved).

        The update is tried first: the row exists for every run of the day but the first,
        so the common case is one statement.
        """
        params = {**key, "q_amount": amount, "q_limit": limit}
        if execute_write(conn, take, params) == 1:
            return None
        self._ensure_row(conn, key)
        if execute_write(conn, take, params) == 1:
            return None
        spent, reserved = conn.execute(_READ, key).one()
        return int(spent), int(reserved)

    def consume(
        self, tenant_id: str, quota: str, amount: int, limit: int, *, conn: Connection | None = None
    ) -> str:
        """Count ``amount`` against today's ``quota`` at once (no reservation), e.g. one run
        against ``runs_per_day``.

        Returns:
            The period counted against (the UTC date, ``YYYY-MM-DD``): pass it to
            :meth:`give_back` to undo the count.

        Raises:
            QuotaExceeded: the quota's ``limit`` would be passed; nothing was counted.
        """
        period, now = self._period()
        with self._backend.control_tx(conn) as conn:
            refused = self._take(conn, _TAKE_SPENT, self._key(tenant_id, period, quota), amount, limit)
        if refused is None:
            return period
        reset = day_start(now) + timedelta(days=1)
        raise QuotaExceeded(
            f"daily quota {quota} of {limit} reached",
            tenant_id=tenant_id,
            quota=quota,
            limit=limit,
            used=refused[0],
            requested=amount,
            reset_at=reset.isoformat(),
            retry_after_s=_seconds_until(reset, now),
        )

    def give_back(
        self, tenant_id: str, quota: str, amount: int, period: str, *, conn: Connection | None = None
    ) -> None:
        """Uncount ``amount`` that :meth:`consume` counted against ``quota`` in ``period``.

        The count goes back to the period it was charged to, not to today: an admission
        undone after midnight UTC must free a run of the day that counted it, and must not
        hand the new day an extra one. Never refused (a limit lowered meanwhile does not
        keep a refund from being made).

        Args:
            period: the period :meth:`consume` returned.
        """
        params = {**self._key(tenant_id, period, quota), "q_amount": amount}
        with self._backend.control_tx(conn) as conn:
            execute_write(conn, _GIVE_BACK, params)

    def reserve(
        self, tenant_id: str, tokens: int, limit: int, *, conn: Connection | None = None
    ) -> Reservation:
        """Hold ``tokens`` of today's ``limit`` for one run.

        Raises:
            ExceedsBudget: ``tokens`` > ``limit``: no day can hold them, so nothing is
                tried (no retry time); in a transaction the caller rolls back.
            QuotaExceeded: spent + reserved + ``tokens`` > ``limit``; fields give the limit,
                usage, request and the reset time (next midnight UTC).
        """
        if tokens > limit:
            raise ExceedsBudget(
                f"this run may use up to {tokens} tokens, more than the whole daily token budget "
                f"of {limit}: ask for fewer output_tokens, send a shorter prompt or raise tokens_per_day",
                tenant_id=tenant_id,
                quota=TOKENS_PER_DAY,
                limit=limit,
                requested=tokens,
            )
        period, now = self._period()
        with self._backend.control_tx(conn) as conn:
            refused = self._take(conn, _TAKE_RESERVED, self._key(tenant_id, period), tokens, limit)
        if refused is None:
            return Reservation(tenant_id, period, tokens)
        reset = day_start(now) + timedelta(days=1)
        raise QuotaExceeded(
            f"daily token budget of {limit} would be exceeded",
            tenant_id=tenant_id,
            quota=TOKENS_PER_DAY,
            limit=limit,
            used=refused[0],
            reserved=refused[1],
            requested=tokens,
            reset_at=reset.isoformat(),
            retry_after_s=_seconds_until(reset, now),
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
        params = {**self._key(tenant_id, period), "q_reserved": reserved, "q_used": used}
        with self._backend.control_tx(conn) as conn:
            execute_write(conn, _SETTLE, params)

    def today(self) -> str:
        """The period counted against now: the UTC date, ``YYYY-MM-DD``."""
        return self._period()[0]

    def spent_today(self, tenant_id: str) -> tuple[int, int]:
        """(spent, reserved) tokens of ``tenant_id`` today."""
        return self.spent_in(tenant_id, self.today())

    def spent_in(self, tenant_id: str, period: str) -> tuple[int, int]:
        """(spent, reserved) tokens of ``tenant_id`` in ``period`` (a UTC date, ``YYYY-MM-DD``,
        as :meth:`today` and :class:`Reservation` give it); ``(0, 0)`` for a period with none."""
        with self._backend.transaction() as conn:
            row = conn.execute(_READ, self._key(tenant_id, period)).first()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))
