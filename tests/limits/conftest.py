"""Fixtures of the limit tests: the real Redis at 127.0.0.1:6379, one key namespace per test.

Redis missing: the test fails, everywhere (``tests.conftest.service_missing``), saying how to
start it: the suite never silently shrinks to the embedded deployment.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from patinox.limits import WindowRateLimiter
from tests.conftest import service_missing

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@dataclass(frozen=True)
class RedisTarget:
    """A reachable Redis and the key prefix reserved for one test (deleted after it)."""

    url: str
    key_prefix: str


@pytest.fixture
def redis_target() -> Iterator[RedisTarget]:
    """The real Redis with a unique ``patinox:test-<hex>`` key prefix; fails under CI if absent."""
    try:
        import redis

        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0, socket_connect_timeout=1)
        client.ping()
    except Exception as err:  # ImportError, redis.RedisError, OSError: all mean "no Redis here"
        service_missing(f"Redis at {REDIS_HOST}:{REDIS_PORT}", err)
    prefix = f"patinox:test-{uuid.uuid4().hex}"
    try:
        yield RedisTarget(REDIS_URL, prefix)
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
