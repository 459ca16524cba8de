"""Fixtures of the limit tests: the run's real Redis (``redis_url``), one key namespace per test.

Redis unusable: the test fails, everywhere (``tests.conftest.service_missing``), saying why:
the suite never silently shrinks to the in-memory limiter.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from patinox.limits import WindowRateLimiter


@dataclass(frozen=True)
class RedisTarget:
    """A reachable Redis and the key prefix reserved for one test (deleted after it)."""

    url: str
    key_prefix: str


@pytest.fixture
def redis_target(redis_url: str) -> Iterator[RedisTarget]:
    """The run's Redis with a unique ``patinox:test-<hex>`` key prefix."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    prefix = f"patinox:test-{uuid.uuid4().hex}"
    try:
        yield RedisTarget(redis_url, prefix)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request: pytest.FixtureRequest) -> Iterator[Callable[[], WindowRateLimiter]]:
    """Factory of limiters on one backend; every limiter made shares that backend's counts.

    For ``memory`` all calls return the same in-process limiter (a memory store is one
    process's); for ``redis`` each call opens a new client on the test's key prefix.
    """
    made: list[WindowRateLimiter] = []
    if request.param == "memory":
        shared = WindowRateLimiter("memory://")
        made.append(shared)

        def factory() -> WindowRateLimiter:
            return shared
    else:
        target: RedisTarget = request.getfixturevalue("redis_target")

        def factory() -> WindowRateLimiter:
            limiter = WindowRateLimiter(target.url, key_prefix=target.key_prefix)
            made.append(limiter)
            return limiter

    yield factory
    for limiter in made:
        limiter.close()
