"""Rate limits: exact admission under concurrency (threads and processes), memory and Redis
alike, namespaced keys, and the RateLimit headers."""

from __future__ import annotations

import multiprocessing
import pickle
import socket
import sys
import threading
from collections.abc import Callable

import pytest

from patinox.errors import (
    ConfigurationError,
    LimitStoreUnavailable,
    MissingDependency,
    RateLimited,
    StorageError,
)
from patinox.limits import RateLimitState, WindowRateLimiter, ratelimit_headers
from patinox.limits.rate import KEY_PREFIX
from tests.limits._hammer import hammer
from tests.limits.conftest import RedisTarget

Factory = Callable[[], WindowRateLimiter]


# --- exact admission under concurrency ------------------------------------------------------


def test_threads_admit_exactly_the_limit(make_limiter: Factory) -> None:
    """16 threads released together by a barrier, 160 hits on a limit of 25: exactly 25 pass."""
    limit, n_threads, attempts = 25, 16, 10
    limiters = [make_limiter() for _ in range(n_threads)]  # Redis: one client per thread
    barrier = threading.Barrier(n_threads)
    admitted: list[RateLimitState] = []
    refused: list[RateLimited] = []
    lock = threading.Lock()

    def go(limiter: WindowRateLimiter) -> None:
        barrier.wait(timeout=30)
        for _ in range(attempts):
            try:
                state = limiter.hit("tenant", limit, tenant_id="t_hot")
                with lock:
                    admitted.append(state)
            except RateLimited as err:
                with lock:
                    refused.append(err)

    threads = [threading.Thread(target=go, args=(lim,)) for lim in limiters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == limit  # limiter_excess == 0
    assert len(refused) == n_threads * attempts - limit
    assert all(0 <= s.remaining < limit and s.limit == limit for s in admitted)
    assert all(1 <= e.retry_after_s <= 60 and e.remaining == 0 for e in refused)


def _hammer_processes(storage_uri: str, key_prefix: str, limit: int) -> tuple[int, int]:
    """4 spawned processes x 4 threads, all released by one cross-process barrier."""
    processes, threads, attempts = 4, 4, 25
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes * threads)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=hammer,
            args=(storage_uri, key_prefix, "t_hot", limit, threads, attempts, start, results),
        )
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    counts = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    results.close()
    results.join_thread()
    return sum(a for a, _ in counts), sum(r for _, r in counts)


def test_four_processes_share_one_redis_limit_exactly(redis_target: RedisTarget) -> None:
    """4 processes (16 threads) hammer one tenant's limit of 50 at once: exactly 50 admitted."""
    admitted, refused = _hammer_processes(redis_target.url, redis_target.key_prefix, limit=50)
    assert admitted == 50  # limiter_excess == 0
    assert refused == 4 * 4 * 25 - 50


def test_memory_store_is_per_process() -> None:
    """The same hammer on ``memory://`` admits the limit once per process: why several API
    processes need the Redis store (and proof the multi-process test can fail)."""
    admitted, _ = _hammer_processes("memory://", KEY_PREFIX, limit=50)
    assert admitted == 4 * 50


# --- memory and Redis behave the same -------------------------------------------------------


def test_sequence_state_and_refusal(make_limiter: Factory) -> None:
    lim = make_limiter()
    states = [lim.hit("tenant", 3, tenant_id="t_a") for _ in range(3)]
    assert [s.remaining for s in states] == [2, 1, 0]
    assert {(s.policy, s.limit, s.window_s) for s in states} == {("tenant", 3, 60)}
    assert all(58 <= s.reset_after_s <= 60 for s in states)
    with pytest.raises(RateLimited) as ei:
        lim.hit("tenant", 3, tenant_id="t_a")
    err = ei.value
    assert (err.tenant_id, err.policy, err.limit, err.remaining, err.window_s) == ("t_a", "tenant", 3, 0, 60)
    assert 1 <= err.retry_after_s <= 60 and err.retry_after_s == err.reset_after_s
    assert err.code == "rate_limited" and err.http_status == 429
    again = pickle.loads(pickle.dumps(err))  # crosses process boundaries intact
    assert isinstance(again, RateLimited) and again.fields == err.fields


def test_tenants_keys_and_limits_have_separate_windows(make_limiter: Factory) -> None:
    lim = make_limiter()
    for _ in range(2):
        lim.hit("tenant", 2, tenant_id="t_a")
    with pytest.raises(RateLimited):
        lim.hit("tenant", 2, tenant_id="t_a")
    # Same key, another tenant: its own window (the tenant id is always in the stored key).
    assert lim.hit("tenant", 2, tenant_id="t_b").remaining == 1
    # Another key of the same tenant (per API key / per agent): its own window.
    assert lim.hit("key:k_1", 2, tenant_id="t_a").remaining == 1
    # A new limit starts a fresh window.
    assert lim.hit("tenant", 5, tenant_id="t_a").remaining == 4


def test_reset_forgets_the_window(make_limiter: Factory) -> None:
    lim = make_limiter()
    lim.hit("tenant", 1, tenant_id="t_a")
    lim.hit("tenant", 1, tenant_id="t_b")
    with pytest.raises(RateLimited):
        lim.hit("tenant", 1, tenant_id="t_a")
    lim.reset("tenant", 1, tenant_id="t_a")
    assert lim.hit("tenant", 1, tenant_id="t_a").remaining == 0
    with pytest.raises(RateLimited):  # the other tenant's window was not touched
        lim.hit("tenant", 1, tenant_id="t_b")


def test_two_limiters_on_one_redis_share_counts(redis_target: RedisTarget) -> None:
    a = WindowRateLimiter(redis_target.url, key_prefix=redis_target.key_prefix)
    b = WindowRateLimiter(redis_target.url, key_prefix=redis_target.key_prefix)
    try:
        a.hit("tenant", 2, tenant_id="t_a")
        assert b.hit("tenant", 2, tenant_id="t_a").remaining == 0
        with pytest.raises(RateLimited):
            a.hit("tenant", 2, tenant_id="t_a")
    finally:
        a.close()
        b.close()


# --- keys, configuration, errors ------------------------------------------------------------


def test_redis_keys_are_namespaced_and_carry_the_tenant(redis_target: RedisTarget) -> None:
    import redis

    assert KEY_PREFIX == "patinox"
    lim = WindowRateLimiter(redis_target.url, key_prefix=redis_target.key_prefix)
    client = redis.Redis.from_url(redis_target.url)
    try:
        lim.hit("tenant", 7, tenant_id="t_alpha")
        lim.hit("agent:a_1", 7, tenant_id="t_beta")
        keys = sorted(k.decode() for k in client.scan_iter(match=f"{redis_target.key_prefix}:*"))
    finally:
        lim.close()
        client.close()
    p = redis_target.key_prefix
    assert p.startswith("patinox:")
    assert keys == [f"{p}:rate/t_alpha/tenant/7/1/minute", f"{p}:rate/t_beta/agent:a_1/7/1/minute"]


def test_unreachable_redis_is_a_storage_error_with_the_cause_chained() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lim = WindowRateLimiter(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(StorageError) as ei:
            lim.hit("tenant", 5, tenant_id="t_a")
    finally:
        lim.close()
    assert ei.value.backend == "redis" and ei.value.__cause__ is not None
    assert ei.value.http_status == 503


def test_ping_names_the_unreachable_limit_store() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lim = WindowRateLimiter(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(LimitStoreUnavailable) as ei:
            lim.ping()
        with pytest.raises(LimitStoreUnavailable) as hit:
            lim.hit("tenant", 5, tenant_id="t_a")
    finally:
        lim.close()
    assert ei.value.code == hit.value.code == "limit_store_unavailable"
    assert ei.value.http_status == 503 and isinstance(ei.value, StorageError)
    assert type(ei.value.__cause__).__name__ == "ConnectionError"


def test_ping_answers_on_a_working_store(redis_target: RedisTarget) -> None:
    for lim in (
        WindowRateLimiter("memory://"),
        WindowRateLimiter(redis_target.url, key_prefix=redis_target.key_prefix),
    ):
        try:
            lim.ping()
        finally:
            lim.close()


def test_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'patinox\[redis\]'"):
        WindowRateLimiter("redis://127.0.0.1:6379/0")


@pytest.mark.parametrize("uri", ["memcached://127.0.0.1:11211", "postgresql://x/y", "nonsense"])
def test_unsupported_storage_is_refused(uri: str) -> None:
    with pytest.raises(ConfigurationError):
        WindowRateLimiter(uri)


# --- headers --------------------------------------------------------------------------------


def test_headers_of_one_policy() -> None:
    h = ratelimit_headers(RateLimitState("tenant", limit=1200, remaining=1187, reset_after_s=42))
    assert h == {"RateLimit-Policy": '"tenant";q=1200;w=60', "RateLimit": '"tenant";r=1187;t=42'}


def test_headers_of_several_policies_and_escaping() -> None:
    h = ratelimit_headers(
        RateLimitState("tenant", 100, 5, 30),
        RateLimitState('we"ird\\', 10, 0, 7, window_s=1),
    )
    assert h["RateLimit-Policy"] == '"tenant";q=100;w=60, "we\\"ird\\\\";q=10;w=1'
    assert h["RateLimit"] == '"tenant";r=5;t=30, "we\\"ird\\\\";r=0;t=7'
    assert ratelimit_headers() == {}
    with pytest.raises(ConfigurationError):
        ratelimit_headers(RateLimitState("caf\u00e9", 1, 1, 1))


def test_headers_of_a_refusal_match_retry_after(make_limiter: Factory) -> None:
    lim = make_limiter()
    lim.hit("tenant", 1, tenant_id="t_a")
    with pytest.raises(RateLimited) as ei:
        lim.hit("tenant", 1, tenant_id="t_a")
    state = RateLimitState.from_refusal(ei.value)
    h = ratelimit_headers(state)
    assert h["RateLimit-Policy"] == '"tenant";q=1;w=60'
    assert h["RateLimit"] == f'"tenant";r=0;t={ei.value.retry_after_s}'


# --- the memory store's expiry --------------------------------------------------------------


def test_memory_window_expires_hits_and_sweeps_idle_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock the test moves: a full window refuses until its oldest hit leaves it, the
    window's start and count are those of the hits inside it, a key whose hits all expired
    is dropped by the next sweep, no thread is ever started, and fixed-window counts
    restart when their window ends."""
    import gc

    from patinox.limits import rate

    clock = [1_000.0]
    monkeypatch.setattr(rate.time, "time", lambda: clock[0])
    threads = threading.active_count()
    store = rate._WindowMemoryStorage()
    assert store.acquire_entry("k", 2, 10)
    clock[0] += 4
    assert store.acquire_entry("k", 2, 10)
    assert not store.acquire_entry("k", 2, 10)  # 2 hits in the last 10 s
    assert store.get_moving_window("k", 2, 10) == (1_000.0, 2)
    assert not store.acquire_entry("k", 3, 10, amount=2)  # 2 + 2 > 3
    clock[0] += 6.5  # the first hit is now 10.5 s old
    assert store.get_moving_window("k", 2, 10) == (1_004.0, 1)
    assert store.acquire_entry("k", 2, 10)
    assert not store.acquire_entry("k", 5, 10, amount=6)  # more than the limit at once

    assert store.acquire_entry("idle", 5, 10)
    clock[0] += 30  # every hit of both keys expired
    store._swept_at -= store.SWEEP_INTERVAL_S
    assert store.acquire_entry("fresh", 1, 10)  # this hit runs the sweep
    assert set(store._hits) == {"fresh"}
    assert threading.active_count() == threads
    # Hits are floats in a deque: nothing per hit for the garbage collector to track.
    assert not any(gc.is_tracked(t) for t in store._hits["fresh"][1])
    assert store.reset() == 1 and store.get_moving_window("fresh", 1, 10) == (clock[0], 0)
    # The fixed-window calls of the Storage interface count within their own window.
    assert store.incr("c", 10) == 1 and store.incr("c", 10, amount=2) == 3
    assert store.get("c") == 3 and store.get_expiry("c") == clock[0] + 10
    clock[0] += 10
    assert store.get("c") == 0 and store.incr("c", 10) == 1
