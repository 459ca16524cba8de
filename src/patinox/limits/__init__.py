"""Resource limits: request rate limits, token quotas, the durable fair run queue, and the
fair share of each process's capacity."""

from patinox.limits._listener import NOTIFY_CHANNEL, QueueListener
from patinox.limits.admission import AdmissionSettings, FairShareAdmission
from patinox.limits.offload import FairStorageExecutor, InlineStorage, StorageCalls, storage_calls
from patinox.limits.queue import DEFAULT_LEASE_S, Claim, FairRunQueue, worker_id
from patinox.limits.quota import RUNS_PER_DAY, TOKENS_PER_DAY, Reservation, TokenBudget, day_start
from patinox.limits.rate import RateLimiter, RateLimitState, WindowRateLimiter, ratelimit_headers

__all__ = [
    "DEFAULT_LEASE_S",
    "NOTIFY_CHANNEL",
    "RUNS_PER_DAY",
    "TOKENS_PER_DAY",
    "AdmissionSettings",
    "Claim",
    "FairRunQueue",
    "FairShareAdmission",
    "FairStorageExecutor",
    "InlineStorage",
    "QueueListener",
    "RateLimitState",
    "RateLimiter",
    "Reservation",
    "StorageCalls",
    "TokenBudget",
    "WindowRateLimiter",
    "day_start",
    "ratelimit_headers",
    "storage_calls",
    "worker_id",
]
