"""Per-tenant request rate limits over the ``limits`` library, in memory or in Redis.

The limiter is a moving window (exact: at most N hits in any rolling 60 s), chosen by a
storage URI in one factory:

- ``memory://`` — counts in this process (the embedded default, one server process);
- ``redis://host:port/db`` (also ``rediss://``, ``redis+unix://``, ``redis+sentinel://``,
  ``redis+cluster://``) — counts shared by every API process and node using that Redis.
  Needs the ``redis`` package: ``pip install 'patinox[redis]'``.

Admission is atomic in both: the memory storage admits under a lock, the Redis storage
runs one Lua script per hit (check the window and push the hit in one step), so N
concurrent callers over any number of processes admit exactly ``limit`` hits per window.
Hit timestamps come from the caller's clock (``time.time()``): nodes sharing a Redis need
synchronised clocks (NTP), as for any moving window over Redis.

Keys. The caller names the limit within its tenant (``tenant``, ``key:<key_id>``,
``agent:<agent_id>``; ``tenant:<tenant_id>`` works too); the limiter always adds the
tenant id, so two tenants can never share a window, and the Redis key is namespaced::

    patinox:rate/<tenant_id>/<key>/<limit>/1/minute

(``<key_prefix>:`` + the ``limits`` item key; the limit is part of it, so a new limit
starts a fresh window). The text of ``key`` before its first ``:`` names the policy in the
``RateLimit`` headers (``tenant:t_x`` → ``"tenant"``).

Headers. :func:`ratelimit_headers` renders :class:`RateLimitState` as the ``RateLimit``
and ``RateLimit-Policy`` fields of the IETF draft *RateLimit header fields for HTTP*,
draft-ietf-httpapi-ratelimit-headers-10 (structured-field lists of named policies).

Source: the `limits` library (https://limits.readthedocs.io): its storages (the Redis one
runs its Lua scripts) and key names, called as its ``MovingWindowRateLimiter`` calls them.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Protocol

from limits import RateLimitItemPerMinute, storage
from limits import errors as limits_errors
from patinox.errors import ConfigurationError, LimitStoreUnavailable, MissingDependency, RateLimited

__all__ = [
    "KEY_PREFIX",
    "WINDOW_S",
    "RateLimitState",
    "RateLimiter",
    "WindowRateLimiter",
    "ratelimit_headers",
]

#: Namespace of every rate-limit key Patinox writes to a shared store (Redis).
KEY_PREFIX = "patinox"
#: Length of the moving window, seconds.
WINDOW_S = 60

_REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster"})
_SCHEMES = _REDIS_SCHEMES | {"memory"}
#: Storage keys a limiter remembers (then it forgets them all and builds them again).
_MAX_KEYS = 4096
#: Defaults for the Redis client, seconds; options in the URI's query string win.
_REDIS_TIMEOUTS: dict[str, float] = {"socket_connect_timeout": 2.0, "socket_timeout": 2.0}


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """The state of one rate-limit policy after a hit: what the ``RateLimit`` headers say.

    Attributes:
        policy: the policy name in the headers (the scope of the key: ``tenant``, ``key``...).
        limit: requests allowed per window.
        remaining: requests still allowed in the current window (>= 0).
        reset_after_s: whole seconds until the oldest hit in the window expires, i.e. until
            at least one more request is allowed (>= 0; rounded up).
        window_s: window length, seconds.
    """

    policy: str
    limit: int
    remaining: int
    reset_after_s: int
    window_s: int = WINDOW_S

    @classmethod
    def from_refusal(cls, err: RateLimited) -> RateLimitState:
        """The state a refusal reports (``remaining`` 0), for the headers of a 429.

        Raises:
            KeyError: ``err`` was not raised by :meth:`WindowRateLimiter.hit` (fields missing).
        """
        if err.policy is None or err.limit is None or err.reset_after_s is None:
            raise KeyError("policy")
        return cls(err.policy, err.limit, 0, err.reset_after_s, err.window_s or WINDOW_S)


class RateLimiter(Protocol):
    """Admit or refuse one hit on a tenant's ``key`` against ``per_minute``."""

    def hit(self, key: str, per_minute: int, *, tenant_id: str, unit: str = "requests") -> RateLimitState: ...

    def reset(self, key: str, per_minute: int, *, tenant_id: str) -> None: ...

    def ping(self) -> None: ...


class WindowRateLimiter:
    """A moving-window limiter backed by a ``limits`` storage (memory or Redis).

    Args:
        storage_uri: ``memory://`` (this process) or a Redis URI such as
            ``redis://127.0.0.1:6379/0`` (shared by every process using that Redis).
        key_prefix: namespace of the keys in Redis (tests use a unique one each).

    Raises:
        ConfigurationError: the URI's scheme is not one listed in the module docstring.
        MissingDependency: a Redis URI and the ``redis`` package is not installed.
    """

    def __init__(self, storage_uri: str = "memory://", *, key_prefix: str = KEY_PREFIX) -> None:
        scheme = urllib.parse.urlparse(storage_uri).scheme
        if scheme not in _SCHEMES:
            raise ConfigurationError(
                f"rate-limit storage must be memory:// or redis://..., not {scheme or storage_uri!r}",
                scheme=scheme,
            )
        self.key_prefix = key_prefix
        self.shared = scheme in _REDIS_SCHEMES
        self._storage: storage.RedisStorage | _WindowMemoryStorage
        #: The in-process storage (``memory://``), or None (Redis).
        self._memory: _WindowMemoryStorage | None = None
        self._driver_errors: type[Exception] | tuple[type[Exception], ...]
        if self.shared:
            self._storage = _redis_storage(storage_uri, key_prefix)
            # The storage's calls are not wrapped by ``limits``: map its errors here.
            self._driver_errors = self._storage.base_exceptions
        else:
            self._storage = self._memory = _WindowMemoryStorage()
            self._driver_errors = ()
        self._items: dict[int, RateLimitItemPerMinute] = {}
        #: (tenant id, key, limit) -> the storage key ``limits`` builds for it (bounded).
        self._keys: dict[tuple[str, str, int], str] = {}

    def _item(self, per_minute: int) -> RateLimitItemPerMinute:
        item = self._items.get(per_minute)
        if item is None:
            item = self._items[per_minute] = RateLimitItemPerMinute(per_minute, namespace="rate")
        return item

    def _stored_key(self, tenant_id: str, key: str, per_minute: int) -> str:
        """The storage key of the tenant's ``key`` at ``per_minute``, as ``limits`` names it
        (``rate/<tenant_id>/<key>/<limit>/1/minute``), remembered for the next hit."""
        stored = self._keys.get((tenant_id, key, per_minute))
        if stored is not None:
            return stored
        if len(self._keys) >= _MAX_KEYS:
            self._keys.clear()
        stored = self._item(per_minute).key_for(tenant_id, key)
        self._keys[(tenant_id, key, per_minute)] = stored
        return stored

    def hit(self, key: str, per_minute: int, *, tenant_id: str, unit: str = "requests") -> RateLimitState:
        """Count one request on the tenant's ``key``.

        Args:
            key: the limit within the tenant (``tenant``, ``key:<id>``, ``agent:<id>``).
            per_minute: requests allowed in any 60 s.
            tenant_id: the tenant; always part of the stored key.
            unit: what is counted, plural, for the refusal's message (``requests``,
                ``runs``).

        Returns:
            The policy's state after this hit (for the ``RateLimit`` headers). Read just
            after the atomic admission, so under concurrency ``remaining`` may already
            count other callers' hits; admission itself is exact.

        Raises:
            RateLimited: ``per_minute`` requests already happened in the last 60 s. Fields:
                ``tenant_id``, ``policy``, ``limit``, ``remaining`` (0), ``window_s``,
                ``reset_after_s`` and ``retry_after_s`` (whole seconds, >= 1: when one
                slot frees).
            LimitStoreUnavailable: the shared store (Redis) failed or timed out (a
                ``StorageError``, ``503``); the driver error is chained.
        """
        stored = self._stored_key(tenant_id, key, per_minute)
        policy = key.partition(":")[0]
        try:
            # The storage's own moving-window calls, as MovingWindowRateLimiter.hit() and
            # get_window_stats() make them, with the key built once; in memory, both in
            # one step under the storage's lock.
            if self._memory is not None:
                admitted, window_start, in_window = self._memory.hit_window(stored, per_minute, WINDOW_S)
            else:
                admitted = self._storage.acquire_entry(stored, per_minute, WINDOW_S)
                window_start, in_window = self._storage.get_moving_window(stored, per_minute, WINDOW_S)
        except self._driver_errors as err:
            raise _unavailable(err, "hit") from err
        reset_time, remaining = window_start + WINDOW_S, per_minute - in_window
        now = time.time()
        if admitted:
            reset_after = max(0, math.ceil(reset_time - now))
            return RateLimitState(policy, per_minute, max(0, remaining), reset_after)
        retry_after = max(1, math.ceil(reset_time - now))
        raise RateLimited(
            f"{policy} rate limit of {per_minute} {unit} per minute reached",
            tenant_id=tenant_id,
            policy=policy,
            limit=per_minute,
            remaining=0,
            window_s=WINDOW_S,
            reset_after_s=retry_after,
            retry_after_s=retry_after,
        )

    def reset(self, key: str, per_minute: int, *, tenant_id: str) -> None:
        """Forget the window of the tenant's ``key`` (a tenant deleted, a test cleaning up).

        Raises:
            LimitStoreUnavailable: the shared store (Redis) failed; the driver error is chained.
        """
        try:
            self._storage.clear(self._stored_key(tenant_id, key, per_minute))
        except self._driver_errors as err:
            raise _unavailable(err, "reset") from err

    def ping(self) -> None:
        """Check that the storage answers, for a readiness probe: a Redis ``PING`` (nothing
        to do for ``memory://``, which is always available).

        Blocks for at most the Redis client's timeouts (2 s to connect and 2 s to read,
        unless the storage URI's query string sets others); a refused connection fails at
        once. Callers on an event loop run it in a thread.

        Raises:
            LimitStoreUnavailable: Redis refused, failed or timed out; the driver error is chained.
        """
        if not isinstance(self._storage, storage.RedisStorage):
            return
        try:
            self._storage.storage.ping()
        except self._driver_errors as err:
            raise _unavailable(err, "ping") from err

    def close(self) -> None:
        """Release the Redis connections (no-op for ``memory://``); the limiter is not used after."""
        if isinstance(self._storage, storage.RedisStorage):
            self._storage.storage.close()


def _unavailable(err: Exception, operation: str) -> LimitStoreUnavailable:
    """The error for a failed call to the shared store (the caller chains ``err``)."""
    return LimitStoreUnavailable(
        f"rate-limit store failed: {type(err).__name__}", backend="redis", operation=operation
    )


class _WindowMemoryStorage(storage.Storage, storage.MovingWindowSupport):
    """In-process moving-window storage with the interface of a ``limits`` storage.

    Per key, the hits' timestamps (``time.time()``, seconds) oldest first in a
    :class:`collections.deque` of floats. Admission drops the hits older than the window
    from the left and admits while fewer than ``limit`` remain, under one lock, so it is
    exact and atomic across threads.

    Why not the library's ``MemoryStorage``: it keeps one ``Entry`` object (and its
    ``__dict__``) per hit, prepends each hit to a list (a copy of the window per hit) and
    expires hits from a ``threading.Timer`` it restarts every 10 ms. At a few hundred
    requests a second that is tens of thousands of live, garbage-collector-tracked objects
    per minute of window, which made most of the server's full collections (and their
    cost), plus a thread start per burst. Floats in a deque are not tracked, and expiry
    here needs no thread: expired hits are dropped when their key is next hit, and keys
    whose hits all expired are swept at most every :data:`SWEEP_INTERVAL_S` by the caller
    that notices the interval passed. Memory: one window of hits per key, plus at most one
    interval of idle keys.

    The fixed-window calls of the ``Storage`` interface (``incr``, ``get``,
    ``get_expiry``) keep a count and its expiry per key, under the same lock and sweep, as
    the library's memory storage does; Patinox's limiter uses only the moving window. A
    key hit with another window length than before starts a fresh window.
    """

    STORAGE_SCHEME = None  # not registered: WindowRateLimiter builds it for memory://
    #: Seconds between two sweeps of keys whose hits all expired.
    SWEEP_INTERVAL_S = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        #: key -> (window length in seconds, hit timestamps oldest first)
        self._hits: dict[str, tuple[float, collections.deque[float]]] = {}
        #: key -> (fixed-window count, when it expires as time.time() seconds)
        self._counts: dict[str, tuple[int, float]] = {}
        self._swept_at = time.monotonic()

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def _live_hits(self, key: str, expiry: int, now: float) -> collections.deque[float]:
        """``key``'s hits still in its window at ``now``, the expired ones dropped; a fresh
        window when the key has none or had another length (caller holds the lock)."""
        slot = self._hits.get(key)
        if slot is None or slot[0] != expiry:
            slot = self._hits[key] = (float(expiry), collections.deque())
        return _drop_expired(slot[1], now - expiry)

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Record ``amount`` hits on ``key`` unless that would make more than ``limit``
        in the last ``expiry`` seconds; True when recorded."""
        if amount > limit:
            return False
        now = time.time()
        with self._lock:
            self._maybe_sweep()
            hits = self._live_hits(key, expiry, now)
            if len(hits) + amount > limit:
                return False
            hits.extend(itertools.repeat(now, amount))
            return True

    def hit_window(self, key: str, limit: int, expiry: int) -> tuple[bool, float, int]:
        """:meth:`acquire_entry` of one hit, then :meth:`get_moving_window`, under one
        lock: (admitted, timestamp of the oldest hit in the window, hits in the window)."""
        now = time.time()
        with self._lock:
            self._maybe_sweep()
            hits = self._live_hits(key, expiry, now)
            admitted = len(hits) < limit
            if admitted:
                hits.append(now)
            return admitted, (hits[0] if hits else now), len(hits)

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(timestamp of the oldest hit in the window, hits in the window) of ``key``;
        ``(now, 0)`` when it has none."""
        now = time.time()
        with self._lock:
            slot = self._hits.get(key)
            if slot is None:
                return now, 0
            hits = _drop_expired(slot[1], now - expiry)
            return (hits[0], len(hits)) if hits else (now, 0)

    def _maybe_sweep(self) -> None:
        """Drop keys whose newest hit left their window (caller holds the lock)."""
        mono = time.monotonic()
        if mono - self._swept_at < self.SWEEP_INTERVAL_S:
            return
        self._swept_at = mono
        now = time.time()
        for key in [k for k, (expiry, hits) in self._hits.items() if not hits or hits[-1] < now - expiry]:
            del self._hits[key]
        for key in [k for k, (_, until) in self._counts.items() if until <= now]:
            del self._counts[key]

    def clear(self, key: str) -> None:
        with self._lock:
            self._hits.pop(key, None)
            self._counts.pop(key, None)

    def reset(self) -> int | None:
        with self._lock:
            cleared = len(self._hits) + len(self._counts)
            self._hits.clear()
            self._counts.clear()
        return cleared

    def check(self) -> bool:
        return True

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` to ``key``'s fixed-window count, starting a window of ``expiry``
        seconds when none is running; returns the new count."""
        now = time.time()
        with self._lock:
            self._maybe_sweep()
            count, until = self._counts.get(key, (0, now))
            if until <= now:
                count, until = 0, now + expiry
            self._counts[key] = (count + amount, until)
            return count + amount

    def get(self, key: str) -> int:
        """``key``'s fixed-window count (0 once its window expired)."""
        with self._lock:
            count, until = self._counts.get(key, (0, 0.0))
        return count if until > time.time() else 0

    def get_expiry(self, key: str) -> float:
        """When ``key``'s fixed window expires (``time.time()`` seconds; now when none runs)."""
        now = time.time()
        with self._lock:
            until = self._counts.get(key, (0, now))[1]
        return max(until, now)


def _drop_expired(hits: collections.deque[float], cutoff: float) -> collections.deque[float]:
    """``hits`` (timestamps, oldest first) without those before ``cutoff``, dropped in place."""
    while hits and hits[0] < cutoff:
        hits.popleft()
    return hits


def _redis_storage(uri: str, key_prefix: str) -> storage.RedisStorage:
    """The ``limits`` Redis storage for ``uri`` with keys under ``key_prefix:``."""
    try:
        import redis  # noqa: F401  (only to tell a missing extra apart)
    except ImportError as err:
        raise MissingDependency(
            "a redis:// rate-limit storage needs the redis package: pip install 'patinox[redis]'",
            extra="redis",
        ) from err
    try:
        built = storage.storage_from_string(uri, key_prefix=key_prefix, **_REDIS_TIMEOUTS)
    except limits_errors.ConfigurationError as err:  # e.g. a redis package too old for ``limits``
        raise MissingDependency(f"{err} Install: pip install 'patinox[redis]'", extra="redis") from err
    assert isinstance(built, storage.RedisStorage)
    return built


@functools.lru_cache(maxsize=4096)
def _sf_string(value: str) -> str:
    """``value`` as a structured-field String (RFC 9651 §3.3.3): quoted, ``\\`` and ``"`` escaped.

    Cached (4,096 names): a request names the same two policies as the one before it, and
    checking a name costs a step per character.

    Raises:
        ConfigurationError: ``value`` has characters a String cannot hold (non-printable ASCII).
    """
    if not all(" " <= ch <= "~" for ch in value):
        raise ConfigurationError(f"policy name {value!r} is not printable ASCII")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ratelimit_headers(*states: RateLimitState) -> dict[str, str]:
    """The ``RateLimit-Policy`` and ``RateLimit`` response headers for one or more policies.

    Follows draft-ietf-httpapi-ratelimit-headers-10 (RateLimit header fields for HTTP):
    each field is a structured-field List with one Item per policy, named by a String::

        RateLimit-Policy: "tenant";q=1200;w=60
        RateLimit: "tenant";r=1187;t=42

    ``q`` is the quota (requests per window), ``w`` the window (seconds), ``r`` the
    remaining requests and ``t`` the seconds until more quota is available. On a 429 the
    caller sends ``Retry-After`` too (its value equals ``t`` here, never earlier, as the
    draft asks); build a refused state from :class:`RateLimited`'s fields.

    Args:
        *states: one state per policy that applied to the request.

    Returns:
        ``{"RateLimit-Policy": ..., "RateLimit": ...}``, or ``{}`` when no state is given.
    """
    if not states:
        return {}
    policies = ", ".join(f"{_sf_string(s.policy)};q={s.limit};w={s.window_s}" for s in states)
    current = ", ".join(
        f"{_sf_string(s.policy)};r={max(0, s.remaining)};t={max(0, s.reset_after_s)}" for s in states
    )
    return {"RateLimit-Policy": policies, "RateLimit": current}
