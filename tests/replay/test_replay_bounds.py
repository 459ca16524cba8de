"""The replay stays open-loop and bounded against a real server that cannot keep up.

``SlowServer`` is a small ASGI app served by uvicorn on a free local port. It serves at
most ``capacity`` runs at once, ``service_s`` seconds each, and keeps the others waiting
(as an overloaded server does); runs of a tenant in ``hang`` never answer until the test
ends. It counts the requests it holds, per tenant and in total, so the in-flight bounds are
checked where they matter: on the server. Timeouts here only guard against a hang; no
assertion is about time.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from patinox.errors import ConfigurationError
from patinox.replay import (
    ACCOUNTING,
    ReplayBounds,
    ReplayProgress,
    ReplayReport,
    TenantHandle,
    TenantReport,
    TraceRequest,
    replay,
)
from patinox.replay._bound import InFlightBound
from tests.cli.conftest import cli
from tests.replay._serve import serve
from tests.replay.test_replay_runner import OPERATOR_KEY, FakeServer, build_app

GUARD_S = 120.0
"""Only a guard against a hang: far above what any run here needs; never an assertion."""


@dataclass
class SlowServer:
    capacity: int = 2
    service_s: float = 0.05
    hang: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    seen: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    total_in_flight: int = 0
    peak_total: int = 0
    _slots: asyncio.Semaphore | None = None

    async def create_run(self, agent_id: str, request: Request) -> Any:
        source = request.headers.get("authorization", "").removeprefix("Bearer key-")
        if agent_id != f"agt-{source}":
            return JSONResponse({"error": {"code": "not_found"}}, status_code=404)
        self.seen[source] += 1
        self.in_flight[source] += 1
        self.total_in_flight += 1
        self.peak[source] = max(self.peak[source], self.in_flight[source])
        self.peak_total = max(self.peak_total, self.total_in_flight)
        try:
            body = await request.json()
            if source in self.hang:
                while not self.release.is_set():
                    await asyncio.sleep(0.01)
            else:
                if self._slots is None:  # made on the server's own event loop
                    self._slots = asyncio.Semaphore(self.capacity)
                async with self._slots:
                    await asyncio.sleep(self.service_s)
            words = len(body["input"].split())
            return {"status": "succeeded", "input_tokens": words, "output_tokens": body["output_tokens"]}
        finally:
            self.in_flight[source] -= 1
            self.total_in_flight -= 1


@pytest.fixture
def slow() -> SlowServer:
    return SlowServer()


@pytest.fixture
def slow_url(slow: SlowServer) -> Iterator[str]:
    app = FastAPI()
    app.post("/v1/agents/{agent_id}/runs")(slow.create_run)
    with serve(app, before_stop=slow.release.set) as url:
        yield url


def _handles(*sources: str) -> dict[str, TenantHandle]:
    return {
        s: TenantHandle(
            source=s, tenant_id=f"ten-{s}", plan="pro", key=f"key-{s}", agent_id=f"agt-{s}", model="simulated"
        )
        for s in sources
    }


def _steady(source: str, rate: float, duration_s: float) -> list[TraceRequest]:
    """Evenly spaced requests: ``rate`` per second of trace for ``duration_s`` seconds."""
    n = round(rate * duration_s)
    return [
        TraceRequest(source=source, offset_s=i / rate, prompt_tokens=2, output_tokens=3) for i in range(n)
    ]


def _assert_accounted(report: ReplayReport, requests: list[TraceRequest]) -> dict[str, TenantReport]:
    """Every scheduled request is in exactly one category, per tenant and in total."""
    scheduled = Counter(r.source for r in requests)
    rows = {t.source: t for t in report.tenants}
    for source, t in rows.items():
        assert t.scheduled == scheduled[source], source
        assert t.completed + t.throttled + t.failed + t.unfinished + t.dropped == t.scheduled, source
        assert t.sent == t.scheduled - t.dropped, source
        assert sum(t.dropped_reasons.values()) == t.dropped, source
        assert 0 <= t.late <= t.sent, source
        assert t.peak_in_flight <= report.max_in_flight_per_tenant, source
    totals = report.totals
    assert totals["scheduled"] == len(requests)
    parts = ("completed", "throttled", "failed", "unfinished", "dropped")
    assert sum(totals[p] for p in parts) == len(requests)
    assert report.peak_in_flight <= report.max_in_flight
    assert report.accounting == ACCOUNTING
    return rows


async def test_a_trace_the_server_cannot_keep_up_with_ends_bounded_and_accounted(
    slow: SlowServer, slow_url: str
) -> None:
    # the server completes about capacity / service_s = 40 runs/s; the trace asks 365/s
    requests = _steady("heavy", 300, 2.0) + _steady("medium", 60, 2.0) + _steady("light", 5, 2.0)
    bounds = ReplayBounds(
        max_in_flight=6, max_in_flight_per_tenant=4, late_tolerance_s=0.1, drain_timeout_s=1.0
    )
    async with asyncio.timeout(GUARD_S):
        report = await replay(
            slow_url, _handles("heavy", "medium", "light"), requests, compression=1.0, bounds=bounds
        )
    rows = _assert_accounted(report, requests)
    # the bounds held where it matters, on the server, and the overload reached them
    assert slow.peak_total == bounds.max_in_flight
    assert all(slow.peak[s] <= bounds.max_in_flight_per_tenant for s in rows)
    assert slow.peak["heavy"] == bounds.max_in_flight_per_tenant
    # what the server could not take was dropped, not queued; what it answered was counted
    assert rows["heavy"].dropped > 0 and rows["heavy"].completed > 0
    assert set(rows["heavy"].dropped_reasons) <= {"tenant_in_flight", "total_in_flight", "deadline"}
    for source, t in rows.items():
        assert t.completed + t.throttled + t.failed <= slow.seen[source] <= t.sent, source
        assert t.send_lag_p50_ms is not None and t.send_lag_p99_ms is not None
        assert t.send_lag_max_ms is not None
        assert t.send_lag_p50_ms <= t.send_lag_p99_ms <= t.send_lag_max_ms
    assert report.max_send_lag_ms == max(t.send_lag_max_ms or 0.0 for t in rows.values())


async def test_requests_in_flight_at_the_drain_deadline_are_cancelled_and_counted(
    slow: SlowServer, slow_url: str
) -> None:
    slow.hang = {"stuck"}
    requests = _steady("stuck", 20, 0.5) + _steady("fine", 20, 0.5)
    bounds = ReplayBounds(
        max_in_flight=16, max_in_flight_per_tenant=3, late_tolerance_s=0.05, drain_timeout_s=2.0
    )
    async with asyncio.timeout(GUARD_S):  # the per-request timeout is far longer than this
        report = await replay(
            slow_url, _handles("stuck", "fine"), requests, compression=1.0, bounds=bounds, timeout_s=600
        )
    rows = _assert_accounted(report, requests)
    stuck, fine = rows["stuck"], rows["fine"]
    assert (stuck.sent, stuck.unfinished, stuck.completed, stuck.dropped) == (3, 3, 0, 7)
    assert stuck.dropped_reasons == {"tenant_in_flight": 7}
    assert slow.peak["stuck"] == 3
    # a tenant whose requests hang holds only its own slots and its own connections
    assert (fine.completed, fine.dropped, fine.unfinished) == (10, 0, 0)


async def test_requests_not_yet_sent_at_the_deadline_are_dropped(slow: SlowServer, slow_url: str) -> None:
    # a tolerance longer than the drain: the last waiting requests meet the deadline first
    slow.hang = {"stuck"}
    requests = _steady("stuck", 20, 0.5)
    bounds = ReplayBounds(
        max_in_flight=16, max_in_flight_per_tenant=2, late_tolerance_s=60.0, drain_timeout_s=0.5
    )
    async with asyncio.timeout(GUARD_S):
        report = await replay(
            slow_url, _handles("stuck"), requests, compression=1.0, bounds=bounds, timeout_s=600
        )
    (stuck,) = _assert_accounted(report, requests).values()
    assert (stuck.sent, stuck.unfinished, stuck.dropped) == (2, 2, 8)
    assert stuck.dropped_reasons == {"deadline": 8}


async def test_a_replay_that_falls_behind_counts_its_late_sends(slow: SlowServer, slow_url: str) -> None:
    slow.service_s = 0.0
    requests = [
        TraceRequest(source="a", offset_s=i * 0.01, prompt_tokens=1, output_tokens=1) for i in range(10)
    ]
    blocked: list[ReplayProgress] = []

    def stall_once(progress: ReplayProgress) -> None:
        if progress.sent == 1 and not blocked:  # the replay's own event loop falls behind
            blocked.append(progress)
            time.sleep(0.3)

    bounds = ReplayBounds(late_tolerance_s=0.05, drain_timeout_s=5.0)
    async with asyncio.timeout(GUARD_S):
        report = await replay(
            slow_url, _handles("a"), requests, compression=1.0, bounds=bounds, on_progress=stall_once
        )
    (a,) = _assert_accounted(report, requests).values()
    # a free slot means the request is still sent, but counted late; its outcome stays its own
    assert (a.late, a.completed, a.dropped) == (10, 10, 0)
    assert a.send_lag_p50_ms is not None and a.send_lag_p50_ms > bounds.late_tolerance_s * 1000


async def test_requests_beyond_the_total_bound_are_dropped_as_such(slow: SlowServer, slow_url: str) -> None:
    slow.hang = {"a", "b"}
    requests = _steady("a", 20, 0.2) + _steady("b", 20, 0.2)
    bounds = ReplayBounds(
        max_in_flight=3, max_in_flight_per_tenant=2, late_tolerance_s=0.01, drain_timeout_s=1.0
    )
    async with asyncio.timeout(GUARD_S):
        report = await replay(
            slow_url, _handles("a", "b"), requests, compression=1.0, bounds=bounds, timeout_s=600
        )
    rows = _assert_accounted(report, requests)
    assert slow.peak_total == 3 and report.peak_in_flight == 3
    assert report.totals["unfinished"] == 3 and report.totals["dropped"] == 5
    reasons = Counter[str]()
    for t in rows.values():
        reasons.update(t.dropped_reasons)
    assert reasons["total_in_flight"] >= 1


# --- the bound itself: forced interleavings -------------------------------------------


async def test_bound_hands_a_freed_slot_to_the_longest_waiter() -> None:
    loop = asyncio.get_running_loop()
    bound = InFlightBound(1)
    assert await bound.take(loop.time())
    first = asyncio.create_task(bound.take(loop.time() + 60))
    second = asyncio.create_task(bound.take(loop.time() + 60))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    bound.give()
    assert await first is True and not second.done()
    bound.give()
    assert await second is True
    bound.give()
    assert (bound.used, bound.peak) == (0, 1)


async def test_bound_gives_up_at_the_deadline_holding_nothing() -> None:
    loop = asyncio.get_running_loop()
    bound = InFlightBound(1)
    assert await bound.take(loop.time())
    assert await bound.take(loop.time()) is False  # a past deadline: only if free now
    assert await bound.take(loop.time() + 0.01) is False
    bound.give()
    assert bound.used == 0
    assert await bound.take(loop.time()) is True


async def test_bound_returns_a_slot_handed_over_as_the_waiter_is_cancelled() -> None:
    loop = asyncio.get_running_loop()
    bound = InFlightBound(1)
    assert await bound.take(loop.time())
    waiter = asyncio.create_task(bound.take(loop.time() + 60))
    await asyncio.sleep(0)
    bound.give()  # the slot passes to the waiter ...
    waiter.cancel()  # ... in the same instant as the waiter is cancelled
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bound.used == 0
    assert await bound.take(loop.time()) is True


async def test_bound_waiter_cancelled_while_waiting_holds_nothing() -> None:
    loop = asyncio.get_running_loop()
    bound = InFlightBound(1)
    assert await bound.take(loop.time())
    waiter = asyncio.create_task(bound.take(loop.time() + 60))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    bound.give()
    assert bound.used == 0


# --- options and the report -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_in_flight": 0},
        {"max_in_flight_per_tenant": 0},
        {"max_in_flight": 2.5},
        {"max_in_flight": True},
        {"late_tolerance_s": -1.0},
        {"late_tolerance_s": float("nan")},
        {"drain_timeout_s": float("inf")},
        {"drain_timeout_s": "5"},
    ],
)
def test_bounds_refuse_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        ReplayBounds(**kwargs)


def test_pool_size_is_the_smaller_bound() -> None:
    assert ReplayBounds(max_in_flight=8, max_in_flight_per_tenant=64).pool_size == 8
    assert ReplayBounds(max_in_flight=256, max_in_flight_per_tenant=16).pool_size == 16


def _tenant(**kw: Any) -> TenantReport:
    base: dict[str, Any] = {
        "tenant_id": "ten",
        "source": "s",
        "plan": "pro",
        "model": "simulated",
        "sent": 5,
        "completed": 3,
        "throttled": 1,
        "failed": 1,
        "p50_ms": None,
        "p99_ms": None,
        "tokens_in": 0,
        "tokens_out": 0,
        "error_codes": {},
    }
    return TenantReport(**{**base, **kw})


def test_tenant_report_refuses_figures_that_do_not_add_up() -> None:
    assert _tenant().scheduled == 5  # a report from before drops: scheduled = sent
    assert _tenant(scheduled=7, dropped=2, dropped_reasons={"deadline": 2}).scheduled == 7
    for broken in (
        {"completed": 4},  # more outcomes than sends
        {"scheduled": 6},  # one request in no category
        {"scheduled": 7, "dropped": 2},  # drops without reasons
        {"late": 6},  # more late than sent
    ):
        with pytest.raises(ValidationError, match="accounting broken"):
            _tenant(**broken)


# --- the command line -------------------------------------------------------------------


def test_replay_help_documents_the_bounds() -> None:
    text = " ".join(cli("replay", "--help", width=400).output.split())
    for option in ("--max-in-flight ", "--max-in-flight-per-tenant", "--late-tolerance", "--drain-timeout"):
        assert option in text, option
    assert "dropped" in text and "unfinished" in text


def test_replay_command_passes_the_bounds_and_writes_the_report(tmp_path: Path) -> None:
    server = FakeServer()
    report_path = tmp_path / "report.json"
    with serve(build_app(server)) as url:
        result = cli(
            "replay",
            "--url", url,
            "--admin-key", OPERATOR_KEY,
            "--plan", "azure-code=pro",
            "--duration", "20",
            "--compression", "20",
            "--max-in-flight", "5",
            "--max-in-flight-per-tenant", "3",
            "--late-tolerance", "0.5",
            "--drain-timeout", "2",
            "--report", str(report_path),
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(report_path.read_text())
    assert (data["max_in_flight"], data["max_in_flight_per_tenant"]) == (5, 3)
    assert (data["late_tolerance_s"], data["drain_timeout_s"]) == (0.5, 2.0)
    (row,) = data["tenants"]
    assert row["scheduled"] == len(server.runs) + row["dropped"] > 0
    assert row["peak_in_flight"] <= 3
    assert data["totals"]["scheduled"] == row["scheduled"]
    assert data["accounting"] == ACCOUNTING
