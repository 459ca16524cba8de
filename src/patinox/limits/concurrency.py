"""Per-tenant cap on runs in flight (one process)."""

from __future__ import annotations

import threading
from collections import defaultdict

from patinox.errors import ConcurrencyLimited


class ConcurrencyLimiter:
    """Counts runs in flight per tenant and refuses the one over the cap.

    Thread-safe; process-local (the count of one server process).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: defaultdict[str, int] = defaultdict(int)

    def acquire(self, tenant_id: str, limit: int) -> RunSlot:
        """Take a slot for one run.

        Raises:
            ConcurrencyLimited: ``limit`` runs of the tenant are already in flight
                (``retry_after_s`` = 1: slots free as runs end, at no known time).
        """
        with self._lock:
            n = self._in_flight[tenant_id]
            if n >= limit:
                raise ConcurrencyLimited(
                    f"{n} runs in flight; the limit is {limit}",
                    tenant_id=tenant_id,
                    limit=limit,
                    in_flight=n,
                    retry_after_s=1,
                )
            self._in_flight[tenant_id] = n + 1
        return RunSlot(self, tenant_id)

    def in_flight(self, tenant_id: str) -> int:
        """Runs of ``tenant_id`` in flight now."""
        with self._lock:
            return self._in_flight.get(tenant_id, 0)

    def _release(self, tenant_id: str) -> None:
        with self._lock:
            n = self._in_flight[tenant_id] - 1
            if n <= 0:
                del self._in_flight[tenant_id]
            else:
                self._in_flight[tenant_id] = n


class RunSlot:
    """One taken slot; :meth:`release` is idempotent."""

    __slots__ = ("_limiter", "_released", "tenant_id")

    def __init__(self, limiter: ConcurrencyLimiter, tenant_id: str) -> None:
        self._limiter = limiter
        self.tenant_id = tenant_id
        self._released = False

    def release(self) -> None:
        """Give the slot back (once)."""
        if not self._released:
            self._released = True
            self._limiter._release(self.tenant_id)
