"""Readiness: whether this server process can serve tenants now (``GET /readyz``).

Three checks, each bounded in time:

- ``database``: ``SELECT 1`` on the deployment's database (:meth:`SqlBackend.ping`);
- ``limit_store``: the rate-limit storage answers (:meth:`WindowRateLimiter.ping`: a Redis
  ``PING``; ``memory://`` is always ``ok``);
- ``workers``: the process's embedded queue worker is running (:attr:`RunWorker.running`);
  ``disabled`` when the deployment runs none (``embedded_workers`` = 0).

The blocking checks run in threads, concurrently, and each gets :data:`CHECK_TIMEOUT_S`:
one that has not answered by then is ``failing`` with error ``timeout``. A check still
running from an earlier probe (a database that does not answer) is awaited again rather
than started twice, so a dead dependency never piles up threads. A check that starts
failing is logged (``dependency_check_failed``, level ``warning``, with the error's type
and first line), and again when it recovers (``dependency_check_recovered``); the HTTP
answer names only the error's type, since ``/readyz`` needs no key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from patinox.api._logging import failure_cause
from patinox.control.worker import RunWorker
from patinox.runtime import Runtime

__all__ = ["CHECK_TIMEOUT_S", "Readiness"]

#: Time each check gets, seconds (all run at once, so ``/readyz`` answers within about this).
CHECK_TIMEOUT_S = 1.0

log = structlog.get_logger("patinox.health")


class Readiness:
    """The readiness checks of one server process.

    Args:
        runtime: the process's runtime (its database backend and rate limiter).
        timeout_s: time each check gets, seconds.

    Attributes:
        worker: the embedded queue worker, set by the app's lifespan when it starts one.
    """

    def __init__(self, runtime: Runtime, *, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self._rt = runtime
        self._timeout_s = timeout_s
        self.worker: RunWorker | None = None
        #: check name -> the thread's future of its latest probe (done or still running)
        self._inflight: dict[str, asyncio.Future[None]] = {}
        #: names of the checks that failed at the last probe
        self._failing: set[str] = set()

    async def check(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Run every check.

        Returns:
            (ready, checks): ``ready`` is true when no check is ``failing``; ``checks`` maps
            ``database``, ``limit_store`` and ``workers`` to ``{"status": "ok" | "failing" |
            "disabled"}``, with ``"error"`` (the failure's type, ``timeout`` or
            ``not_running``) when failing.
        """
        database, limit_store = await asyncio.gather(
            self._probe("database", self._rt.backend.ping), self._probe("limit_store", self._rt.rate.ping)
        )
        checks = {"database": database, "limit_store": limit_store, "workers": self._workers()}
        return all(c["status"] != "failing" for c in checks.values()), checks

    async def _probe(self, name: str, ping: Callable[[], None]) -> dict[str, Any]:
        running = self._inflight.get(name)
        if running is None or running.done():
            running = self._inflight[name] = asyncio.ensure_future(asyncio.to_thread(ping))
            # A probe given up on (timeout) must not leave its error unretrieved.
            running.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait_for(asyncio.shield(running), self._timeout_s)
        except TimeoutError:
            return self._failed(name, "timeout", f"no answer within {self._timeout_s} s")
        except Exception as err:  # a failing dependency is an answer, not a 500
            return self._failed(name, *failure_cause(err))
        return self._ok(name)

    def _workers(self) -> dict[str, Any]:
        if self._rt.settings.embedded_workers <= 0:
            return {"status": "disabled"}
        if self.worker is None or not self.worker.running:
            return self._failed("workers", "not_running", "the embedded queue worker is not running")
        return self._ok("workers")

    def _ok(self, name: str) -> dict[str, Any]:
        if name in self._failing:
            self._failing.discard(name)
            log.info("dependency_check_recovered", dependency=name)
        return {"status": "ok"}

    def _failed(self, name: str, error: str, detail: str) -> dict[str, Any]:
        if name not in self._failing:
            self._failing.add(name)
            log.warning("dependency_check_failed", dependency=name, error=error, cause=detail)
        return {"status": "failing", "error": error}
