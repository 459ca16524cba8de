"""Resource limits: request rate limits, token quotas, and the durable fair run queue."""

from patinox.limits.queue import DEFAULT_LEASE_S, Claim, FairRunQueue, worker_id
from patinox.limits.quota import RUNS_PER_DAY, TOKENS_PER_DAY, Reservation, TokenBudget, day_start
from patinox.limits.rate import RateLimiter, RateLimitState, WindowRateLimiter, ratelimit_headers

__all__ = [
    "DEFAULT_LEASE_S",
    "RUNS_PER_DAY",
    "TOKENS_PER_DAY",
    "Claim",
    "FairRunQueue",
    "RateLimitState",
    "RateLimiter",
    "Reservation",
    "TokenBudget",
    "WindowRateLimiter",
    "day_start",
    "ratelimit_headers",
    "worker_id",
]
