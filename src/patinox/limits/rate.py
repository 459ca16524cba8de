"""Per-tenant request rate limits over the ``limits`` library.

The limiter is a moving window (exact: at most N hits in any rolling window), chosen by a
storage URI: ``memory://`` (one process, the embedded default). The key a limit applies
to is built by the caller (``tenant:<id>``; per-key and per-agent limits use other keys).

Source: the `limits` library (https://limits.readthedocs.io), MovingWindowRateLimiter.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from limits import RateLimitItemPerMinute, storage, strategies
from patinox.errors import RateLimited


class RateLimiter(Protocol):
    """Admit or refuse one hit on ``key`` against ``per_minute``."""

    def hit(self, key: str, per_minute: int, *, tenant_id: str) -> None: ...

    def reset(self, key: str, per_minute: int) -> None: ...


class WindowRateLimiter:
    """A moving-window limiter backed by a ``limits`` storage.

    Args:
        storage_uri: a ``limits`` storage URI; ``memory://`` keeps counts in this process.
    """

    def __init__(self, storage_uri: str = "memory://") -> None:
        self._storage = storage.storage_from_string(storage_uri)
        self._limiter = strategies.MovingWindowRateLimiter(self._storage)
        self._items: dict[int, RateLimitItemPerMinute] = {}

    def _item(self, per_minute: int) -> RateLimitItemPerMinute:
        item = self._items.get(per_minute)
        if item is None:
            item = self._items[per_minute] = RateLimitItemPerMinute(per_minute)
        return item

    def hit(self, key: str, per_minute: int, *, tenant_id: str) -> None:
        """Count one request on ``key``.

        Raises:
            RateLimited: ``per_minute`` requests already happened in the last 60 s; the
                error's ``retry_after_s`` (whole seconds, >= 1) says when one slot frees.
        """
        item = self._item(per_minute)
        if self._limiter.hit(item, key):
            return
        stats = self._limiter.get_window_stats(item, key)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimited(
            f"rate limit of {per_minute} requests per minute reached",
            tenant_id=tenant_id,
            limit=per_minute,
            window_s=60,
            retry_after_s=retry_after,
        )

    def reset(self, key: str, per_minute: int) -> None:
        """Forget the window of ``key`` (used when a tenant is deleted)."""
        self._limiter.clear(self._item(per_minute), key)
