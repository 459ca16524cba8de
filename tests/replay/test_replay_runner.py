"""The replay runner against a tiny in-test server implementing the HTTP contract.

The fake server decides each run's answer from the tenant's source name, so outcomes are
deterministic: ``ok*`` always 200, ``limited*`` 200 for its first two runs then 429
``rate_limited``, ``quota*`` 429 ``quota_exceeded``, ``broken*`` 500, ``slow*`` waits until
every ``slow`` run is in flight (a barrier: proves sends do not wait for answers),
``sleepy*`` answers only once the test sets ``wake_sleepy`` (forces client timeouts).
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from rich.console import Console

from patinox.errors import ConfigurationError, OperationFailed
from patinox.replay import (
    ReplayProgress,
    TenantHandle,
    TraceRequest,
    onboard,
    percentile,
    prompt_of,
    render_table,
    replay,
)
from tests.replay._serve import serve

OPERATOR_KEY = "operator-secret"
BASE_URL = "http://patinox.test"


@dataclass
class RunSeen:
    tenant_id: str
    source: str
    words: int
    output_tokens: int
    at: float  # time.monotonic() when the server saw it, seconds


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": code.replace("_", " "), "details": {}}}
    return JSONResponse(body, status_code=status, headers=headers)


def _bearer(request: Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ")


@dataclass
class FakeServer:
    """State and routes of the fake Patinox server (the HTTP contract, nothing more)."""

    slow_expected: int = 0
    tenants: dict[str, dict[str, str]] = field(default_factory=dict)
    keys: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[RunSeen] = field(default_factory=list)
    run_counts: dict[str, int] = field(default_factory=dict)
    slow_in_flight: int = 0
    slow_release: asyncio.Event | None = None
    wake_sleepy: threading.Event = field(default_factory=threading.Event)

    def source_of(self, tenant_id: str) -> str:
        return self.tenants[tenant_id]["name"].removeprefix("t-")

    async def create_tenant(self, request: Request) -> Any:
        if _bearer(request) != OPERATOR_KEY:
            return _error(401, "unauthenticated")
        body = await request.json()
        if body["plan"] not in {"free", "pro", "enterprise"}:
            return _error(422, "invalid_request")
        tenant_id = f"ten_{len(self.tenants)}"
        self.tenants[tenant_id] = {"name": body["name"], "plan": body["plan"]}
        return {"id": tenant_id, "name": body["name"], "plan": body["plan"]}

    async def create_key(self, tenant_id: str, request: Request) -> Any:
        if _bearer(request) != OPERATOR_KEY:
            return _error(401, "unauthenticated")
        if tenant_id not in self.tenants:
            return _error(404, "not_found")
        body = await request.json()
        secret = f"pk_{secrets.token_hex(8)}"
        self.keys[secret] = (tenant_id, body["scopes"])
        return {"id": f"key_{len(self.keys)}", "key": secret, "name": body["name"]}

    async def create_agent(self, request: Request) -> Any:
        if _bearer(request) not in self.keys:
            return _error(401, "unauthenticated")
        tenant_id, scopes = self.keys[_bearer(request)]
        if "agents:write" not in scopes:
            return _error(403, "forbidden")
        body = await request.json()
        agent_id = f"agt_{len(self.agents)}"
        self.agents[agent_id] = {"tenant_id": tenant_id, **body}
        return {"id": agent_id, **body}

    async def create_run(self, agent_id: str, request: Request) -> Any:
        seen_at = time.monotonic()
        if _bearer(request) not in self.keys:
            return _error(401, "unauthenticated")
        tenant_id, _ = self.keys[_bearer(request)]
        agent = self.agents.get(agent_id)
        if agent is None or agent["tenant_id"] != tenant_id:
            return _error(404, "not_found")
        body = await request.json()
        source = self.source_of(tenant_id)
        words = len(body["input"].split())
        self.runs.append(RunSeen(tenant_id, source, words, body["output_tokens"], seen_at))
        count = self.run_counts[tenant_id] = self.run_counts.get(tenant_id, 0) + 1
        refusal = await self.outcome(source, count)
        if refusal is not None:
            return refusal
        return {
            "id": f"run_{len(self.runs)}",
            "status": "succeeded",
            "input_tokens": words,
            "output_tokens": body["output_tokens"],
            "duration_ms": 1.0,
        }

    async def outcome(self, source: str, count: int) -> JSONResponse | None:
        """The error answer for this run, or None to succeed (maybe after waiting)."""
        if source.startswith("limited") and count > 2:
            return _error(429, "rate_limited", {"Retry-After": "1"})
        if source.startswith("quota"):
            return _error(429, "quota_exceeded", {"Retry-After": "3600"})
        if source.startswith("broken"):
            return _error(500, "internal_error")
        if source.startswith("slow"):
            if self.slow_release is None:
                self.slow_release = asyncio.Event()
            self.slow_in_flight += 1
            if self.slow_in_flight == self.slow_expected:
                self.slow_release.set()
            try:  # a safety net so a sequential runner fails instead of hanging
                await asyncio.wait_for(self.slow_release.wait(), timeout=30)
            except TimeoutError:
                return _error(500, "barrier_not_reached")
        if source.startswith("sleepy"):
            while not self.wake_sleepy.is_set():  # until the test has its answer
                await asyncio.sleep(0.01)
        return None


def build_app(state: FakeServer) -> FastAPI:
    app = FastAPI()
    app.post("/admin/tenants", status_code=201)(state.create_tenant)
    app.post("/admin/tenants/{tenant_id}/keys", status_code=201)(state.create_key)
    app.post("/v1/agents", status_code=201)(state.create_agent)
    app.post("/v1/agents/{agent_id}/runs")(state.create_run)
    return app


class RefusingTransport(httpx.AsyncBaseTransport):
    """Delegates to ``inner`` except for runs of the given agents, which fail to connect."""

    def __init__(self, inner: httpx.AsyncBaseTransport, refused_agents: set[str]) -> None:
        self.inner = inner
        self.refused_agents = refused_agents

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if any(f"/agents/{a}/runs" in request.url.path for a in self.refused_agents):
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def transport(server: FakeServer) -> httpx.ASGITransport:
    return httpx.ASGITransport(app=build_app(server))


async def _onboard(transport: httpx.AsyncBaseTransport, sources: dict[str, str]) -> dict[str, TenantHandle]:
    return await onboard(
        BASE_URL, OPERATOR_KEY, sources, model="simulated", name_prefix="t-", transport=transport
    )


def _requests(source: str, n: int, *, start: float = 0.0, step: float = 0.001) -> list[TraceRequest]:
    return [
        TraceRequest(source=source, offset_s=start + i * step, prompt_tokens=3 + i, output_tokens=7)
        for i in range(n)
    ]


# --- onboarding -------------------------------------------------------------------------


async def test_onboard_creates_tenant_key_and_agent_per_source(
    server: FakeServer, transport: httpx.ASGITransport
) -> None:
    handles = await _onboard(transport, {"azure-code": "pro", "azure-conv": "free"})
    assert set(handles) == {"azure-code", "azure-conv"}
    names = {t["name"]: t["plan"] for t in server.tenants.values()}
    assert names == {"t-azure-code": "pro", "t-azure-conv": "free"}
    for source, handle in handles.items():
        assert server.tenants[handle.tenant_id]["name"] == f"t-{source}"
        assert server.keys[handle.key] == (handle.tenant_id, ["agents:write", "runs:write", "read"])
        agent = server.agents[handle.agent_id]
        assert (agent["tenant_id"], agent["model"], agent["tools"]) == (
            handle.tenant_id,
            "simulated",
            [],
        )
        assert handle.key not in repr(handle)


async def test_onboard_refusal_raises_with_step_and_code(transport: httpx.ASGITransport) -> None:
    with pytest.raises(OperationFailed, match=r"create tenant.*401 unauthenticated") as info:
        await onboard(
            BASE_URL,
            "wrong",
            {"a": "pro"},
            model="simulated",
            name_prefix="t-",
            transport=transport,
        )
    assert info.value.fields["error_code"] == "unauthenticated"


async def test_onboard_unknown_plan_is_refused_before_any_call(
    server: FakeServer, transport: httpx.ASGITransport
) -> None:
    with pytest.raises(ConfigurationError, match="platinum"):
        await _onboard(transport, {"a": "platinum"})
    assert server.tenants == {}


# --- replay accounting ------------------------------------------------------------------


async def test_replay_accounts_for_every_request(server: FakeServer, transport: httpx.ASGITransport) -> None:
    sources = {"ok": "pro", "limited": "free", "quota": "free", "broken": "pro", "down": "pro"}
    handles = await _onboard(transport, sources)
    requests = (
        _requests("ok", 5)
        + _requests("limited", 5)
        + _requests("quota", 2)
        + _requests("broken", 3)
        + _requests("down", 2)
    )
    flaky = RefusingTransport(transport, {handles["down"].agent_id})
    report = await replay(BASE_URL, handles, requests, compression=1.0, trace="test", transport=flaky)
    rows = {t.source: t for t in report.tenants}
    counts = {s: (t.sent, t.completed, t.throttled, t.failed) for s, t in rows.items()}
    assert counts == {
        "ok": (5, 5, 0, 0),
        "limited": (5, 2, 3, 0),
        "quota": (2, 0, 2, 0),
        "broken": (3, 0, 0, 3),
        "down": (2, 0, 0, 2),
    }
    for t in report.tenants:
        assert t.scheduled == t.sent == t.completed + t.throttled + t.failed
        assert (t.dropped, t.unfinished, t.dropped_reasons) == (0, 0, {})
        assert t.tenant_id == handles[t.source].tenant_id
        assert t.plan == sources[t.source]
    assert rows["limited"].error_codes == {"rate_limited": 3}
    assert rows["quota"].error_codes == {"quota_exceeded": 2}
    assert rows["broken"].error_codes == {"internal_error": 3}
    assert rows["down"].error_codes == {"connect_error": 2}
    assert rows["ok"].error_codes == {}
    # tokens are the server's figures over completed runs only
    assert rows["ok"].tokens_in == sum(range(3, 8))
    assert rows["ok"].tokens_out == 5 * 7
    assert rows["limited"].tokens_in == 3 + 4
    assert rows["broken"].tokens_in == rows["broken"].tokens_out == 0
    assert rows["ok"].p50_ms is not None and rows["ok"].p99_ms is not None
    assert rows["broken"].p50_ms is None and rows["broken"].p99_ms is None
    # the server saw every request that was not refused at connect time
    assert len(server.runs) == len(requests) - 2


async def test_prompt_has_exactly_prompt_tokens_words(
    server: FakeServer, transport: httpx.ASGITransport
) -> None:
    handles = await _onboard(transport, {"ok": "pro"})
    sizes = [1, 2, 17, 4096, 20_000]
    requests = [
        TraceRequest(source="ok", offset_s=i * 0.001, prompt_tokens=n, output_tokens=n + 1)
        for i, n in enumerate(sizes)
    ]
    report = await replay(BASE_URL, handles, requests, compression=1.0, transport=transport)
    assert sorted(r.words for r in server.runs) == sizes
    assert sorted(r.output_tokens for r in server.runs) == [n + 1 for n in sizes]
    assert report.tenants[0].tokens_in == sum(sizes)
    assert all(len(prompt_of(n).split()) == n for n in sizes)


async def test_output_tokens_are_clamped_and_reported(
    server: FakeServer, transport: httpx.ASGITransport
) -> None:
    handles = await _onboard(transport, {"ok": "pro"})
    requests = [
        TraceRequest(source="ok", offset_s=0.0, prompt_tokens=1, output_tokens=n)
        for n in (10, 100, 5000, 32768)
    ]
    report = await replay(
        BASE_URL, handles, requests, compression=1.0, max_output_tokens=100, transport=transport
    )
    assert sorted(r.output_tokens for r in server.runs) == [10, 100, 100, 100]
    assert (report.max_output_tokens, report.clamped_requests) == (100, 2)
    text = _render(report)
    assert "capped at 100" in text and "2 requests lowered" in text


async def test_sends_do_not_wait_for_answers(server: FakeServer, transport: httpx.ASGITransport) -> None:
    # every "slow" run blocks until all of them are in flight at once
    server.slow_expected = 6
    handles = await _onboard(transport, {"slow": "pro"})
    report = await replay(
        BASE_URL, handles, _requests("slow", 6, step=0.01), compression=1.0, transport=transport
    )
    assert report.tenants[0].completed == 6
    assert server.slow_in_flight == 6


# --- scheduling -------------------------------------------------------------------------


async def test_arrivals_keep_order_and_compressed_offsets(
    server: FakeServer, transport: httpx.ASGITransport
) -> None:
    handles = await _onboard(transport, {"a": "pro", "b": "pro"})
    offsets = [0.0, 0.15, 0.3, 0.6, 0.75, 1.2]
    requests = [
        TraceRequest(source="ab"[i % 2], offset_s=o, prompt_tokens=i + 1, output_tokens=1)
        for i, o in enumerate(offsets)
    ]
    compression = 3.0
    before = time.monotonic()
    report = await replay(
        BASE_URL, handles, list(reversed(requests)), compression=compression, transport=transport
    )
    # the prompt length identifies the request
    seen = sorted(server.runs, key=lambda r: r.at)
    assert [r.words for r in seen] == [i + 1 for i in range(len(offsets))]
    for run in seen:
        assert run.at - before >= offsets[run.words - 1] / compression
    assert report.wall_time_s >= offsets[-1] / compression
    assert report.trace_duration_s == offsets[-1]
    assert report.compression == compression
    assert report.max_send_lag_ms >= 0
    for t in report.tenants:  # the send lag, per tenant
        assert t.send_lag_p50_ms is not None and t.send_lag_p99_ms is not None
        assert t.send_lag_max_ms is not None
        assert 0 <= t.send_lag_p50_ms <= t.send_lag_p99_ms <= t.send_lag_max_ms <= report.max_send_lag_ms


async def test_progress_is_reported(server: FakeServer, transport: httpx.ASGITransport) -> None:
    handles = await _onboard(transport, {"ok": "pro", "broken": "free"})
    snapshots: list[ReplayProgress] = []
    await replay(
        BASE_URL,
        handles,
        _requests("ok", 4) + _requests("broken", 2),
        compression=1.0,
        on_progress=snapshots.append,
        transport=transport,
    )
    assert snapshots[0] == ReplayProgress(total=6, sent=0, finished=0, completed=0, throttled=0, failed=0)
    assert snapshots[-1] == ReplayProgress(total=6, sent=6, finished=6, completed=4, throttled=0, failed=2)
    assert [s.sent for s in snapshots] == sorted(s.sent for s in snapshots)
    assert all(s.finished <= s.sent for s in snapshots)


# --- validation, report -----------------------------------------------------------------


async def test_source_without_handle_is_refused(transport: httpx.ASGITransport) -> None:
    handles = await _onboard(transport, {"ok": "pro"})
    with pytest.raises(ConfigurationError, match="other"):
        await replay(BASE_URL, handles, _requests("other", 1), compression=1.0, transport=transport)
    with pytest.raises(ConfigurationError, match="compression"):
        await replay(BASE_URL, handles, _requests("ok", 1), compression=0.0, transport=transport)


async def test_idle_tenant_is_listed_and_report_serialises(
    transport: httpx.ASGITransport,
) -> None:
    handles = await _onboard(transport, {"ok": "pro", "idle": "free"})
    report = await replay(BASE_URL, handles, _requests("ok", 2), compression=2.0, transport=transport)
    data = json.loads(report.to_json())
    rows = {t["source"]: t for t in data["tenants"]}
    assert rows["idle"]["sent"] == rows["idle"]["scheduled"] == 0
    assert rows["idle"]["send_lag_max_ms"] is None
    assert rows["idle"]["p50_ms"] is None and rows["idle"]["p99_ms"] is None
    assert set(rows["ok"]) >= {
        "tenant_id",
        "source",
        "plan",
        "sent",
        "completed",
        "throttled",
        "failed",
        "p50_ms",
        "p99_ms",
        "tokens_in",
        "tokens_out",
        "error_codes",
        "scheduled",
        "unfinished",
        "dropped",
        "late",
        "dropped_reasons",
        "send_lag_p50_ms",
        "send_lag_p99_ms",
        "send_lag_max_ms",
        "peak_in_flight",
    }
    assert data["totals"]["scheduled"] == data["totals"]["completed"] == 2
    assert data["deadline_s"] == data["trace_duration_s"] / 2.0 + data["drain_timeout_s"]
    assert data["trace"] == "ok" and data["compression"] == 2.0
    assert data["percentile_method"] == "nearest-rank"
    text = _render(report)
    assert "idle" in text and "simulated" in text


def _render(report: Any) -> str:
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(render_table(report))
    return console.export_text()


@pytest.mark.parametrize(
    ("samples", "p", "expected"),
    [
        ([], 50, None),
        ([5.0], 99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([4.0, 1.0, 3.0, 2.0], 99, 4.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 101)], 50, 50.0),
    ],
)
def test_percentile_is_nearest_rank(samples: list[float], p: float, expected: float | None) -> None:
    assert percentile(samples, p) == expected


# --- over a real socket on 127.0.0.1 ---------------------------------------------------


@pytest.fixture
def live_server(server: FakeServer) -> Iterator[str]:
    with serve(build_app(server), before_stop=server.wake_sleepy.set) as url:
        yield url


async def test_replay_over_http_with_timeouts(server: FakeServer, live_server: str) -> None:
    handles = await onboard(
        live_server,
        OPERATOR_KEY,
        {"ok": "pro", "sleepy": "pro"},
        model="simulated",
        name_prefix="t-",
    )
    report = await replay(
        live_server,
        handles,
        _requests("ok", 3) + _requests("sleepy", 2),
        compression=1.0,
        timeout_s=1.0,
    )
    server.wake_sleepy.set()
    rows = {t.source: t for t in report.tenants}
    assert (rows["ok"].sent, rows["ok"].completed) == (3, 3)
    assert (rows["sleepy"].sent, rows["sleepy"].failed) == (2, 2)
    assert rows["sleepy"].error_codes == {"timeout": 2}
