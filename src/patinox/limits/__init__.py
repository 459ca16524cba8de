"""Resource limits: request rate limits, concurrent-run caps, token quotas."""

from patinox.limits.concurrency import ConcurrencyLimiter, RunSlot
from patinox.limits.quota import Reservation, TokenBudget, day_start
from patinox.limits.rate import RateLimiter, RateLimitState, WindowRateLimiter, ratelimit_headers

__all__ = [
    "ConcurrencyLimiter",
    "RateLimitState",
    "RateLimiter",
    "Reservation",
    "RunSlot",
    "TokenBudget",
    "WindowRateLimiter",
    "day_start",
    "ratelimit_headers",
]
