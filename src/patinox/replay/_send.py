"""The open-loop sender: each tenant's requests leave at their due times through its own
client, bounded in flight per tenant and in total; what cannot leave in time is dropped,
and every request is counted in exactly one outcome."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from patinox.replay._bound import InFlightBound, ReplayBounds
from patinox.replay._onboard import TenantHandle, error_of
from patinox.replay._report import ProgressCallback, ReplayProgress, TenantReport, percentile
from patinox.replay.traces import TraceRequest

_THROTTLE_STATUS = 429
_Outcome = Literal["completed", "throttled", "failed", "unfinished"]
_DropReason = Literal["tenant_in_flight", "total_in_flight", "deadline"]

_Answer = tuple[_Outcome, str | None, tuple[int, int], float]
"""(outcome, error code or None, (input tokens, output tokens), latency ms) of one run."""


@dataclass(slots=True)
class Tally:
    """One tenant's client, in-flight bound and counters; only touched from the event loop."""

    handle: TenantHandle
    client: httpx.AsyncClient
    bound: InFlightBound
    scheduled: int
    sent: int = 0
    completed: int = 0
    throttled: int = 0
    failed: int = 0
    unfinished: int = 0
    late: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    send_lags_ms: list[float] = field(default_factory=list)
    error_codes: Counter[str] = field(default_factory=Counter)
    dropped_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def dropped(self) -> int:
        return self.dropped_reasons.total()

    def report(self, source: str) -> TenantReport:
        return TenantReport(
            tenant_id=self.handle.tenant_id,
            source=source,
            plan=self.handle.plan,
            model=self.handle.model,
            scheduled=self.scheduled,
            sent=self.sent,
            completed=self.completed,
            throttled=self.throttled,
            failed=self.failed,
            unfinished=self.unfinished,
            dropped=self.dropped,
            late=self.late,
            p50_ms=percentile(self.latencies_ms, 50),
            p99_ms=percentile(self.latencies_ms, 99),
            send_lag_p50_ms=percentile(self.send_lags_ms, 50),
            send_lag_p99_ms=percentile(self.send_lags_ms, 99),
            send_lag_max_ms=max(self.send_lags_ms, default=None),
            peak_in_flight=self.peak_in_flight,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            error_codes=dict(sorted(self.error_codes.items())),
            dropped_reasons=dict(sorted(self.dropped_reasons.items())),
        )


@dataclass(slots=True)
class ReplayState:
    """Shared state of one replay; only touched from the event loop."""

    bounds: ReplayBounds
    bound: InFlightBound
    compression: float
    max_output_tokens: int | None
    on_progress: ProgressCallback | None
    total: int
    start: float = 0.0
    clamped: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    tasks: set[asyncio.Task[_Answer]] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)

    def progress(self) -> None:
        if self.on_progress is None:
            return
        c = self.counts
        self.on_progress(
            ReplayProgress(
                total=self.total,
                sent=c["sent"],
                finished=c["completed"] + c["throttled"] + c["failed"] + c["unfinished"],
                completed=c["completed"],
                throttled=c["throttled"],
                failed=c["failed"],
                dropped=c["dropped"],
                unfinished=c["unfinished"],
                late=c["late"],
            )
        )


def prompt_of(words: int) -> str:
    """A prompt of exactly ``words`` whitespace-separated words (the simulated tokenizer
    counts one token per word)."""
    return " ".join(["token"] * words)


def _classify(response: httpx.Response) -> tuple[_Outcome, str | None, tuple[int, int]]:
    """(outcome, error code or None, (input tokens, output tokens)) of one answer."""
    if response.status_code == _THROTTLE_STATUS:
        return "throttled", error_of(response)[0], (0, 0)
    if not response.is_success:
        return "failed", error_of(response)[0], (0, 0)
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return "failed", "bad_response", (0, 0)
    status = body.get("status")
    tokens_in, tokens_out = body.get("input_tokens"), body.get("output_tokens")
    if status != "succeeded":
        return "failed", f"run_{status}", (0, 0)
    if not isinstance(tokens_in, int) or not isinstance(tokens_out, int):
        return "failed", "bad_response", (0, 0)
    return "completed", None, (tokens_in, tokens_out)


async def _post_run(
    client: httpx.AsyncClient, handle: TenantHandle, request: TraceRequest, output_tokens: int
) -> _Answer:
    """(outcome, error code, tokens, latency ms) of one run; never raises for HTTP or
    transport failures."""
    started = time.perf_counter()
    try:
        response = await client.post(
            f"/v1/agents/{handle.agent_id}/runs",
            json={"input": prompt_of(request.prompt_tokens), "output_tokens": output_tokens},
        )
    except httpx.TimeoutException:
        return "failed", "timeout", (0, 0), 0.0
    except httpx.ConnectError:
        return "failed", "connect_error", (0, 0), 0.0
    except httpx.RequestError:
        return "failed", "transport_error", (0, 0), 0.0
    outcome, code, tokens = _classify(response)
    return outcome, code, tokens, (time.perf_counter() - started) * 1000.0


def _drop(run: ReplayState, tally: Tally, reason: _DropReason, n: int = 1) -> None:
    if n > 0:
        tally.dropped_reasons[reason] += n
        run.counts["dropped"] += n
        run.progress()


async def _take_slots(run: ReplayState, tally: Tally, give_up: float) -> _DropReason | None:
    """Hold one of the tenant's slots and one of the run's, waiting until ``give_up`` at
    most; None when both are held, else why the request must be dropped (nothing held)."""
    if not await tally.bound.take(give_up):
        return "tenant_in_flight"
    try:
        if await run.bound.take(give_up):
            return None
    except BaseException:
        tally.bound.give()
        raise
    tally.bound.give()
    return "total_in_flight"


async def dispatch(run: ReplayState, tally: Tally, requests: Sequence[TraceRequest]) -> None:
    """Send one tenant's requests at their due times, in order; drop what cannot be sent in
    time. When cancelled (the deadline), the requests not yet handled count as dropped."""
    loop = asyncio.get_running_loop()
    handled = 0
    try:
        for request in requests:
            due = run.start + request.offset_s / run.compression
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            reason = await _take_slots(run, tally, due + run.bounds.late_tolerance_s)
            handled += 1
            if reason is None:
                _launch(run, tally, request, due)
            else:
                _drop(run, tally, reason)
    except asyncio.CancelledError:
        _drop(run, tally, "deadline", len(requests) - handled)
        raise


def _launch(run: ReplayState, tally: Tally, request: TraceRequest, due: float) -> None:
    """Hand one request, whose two slots are held, to its tenant's client."""
    output_tokens = request.output_tokens
    if run.max_output_tokens is not None and output_tokens > run.max_output_tokens:
        output_tokens = run.max_output_tokens
        run.clamped += 1
    tally.sent += 1
    tally.in_flight += 1
    tally.peak_in_flight = max(tally.peak_in_flight, tally.in_flight)
    run.counts["sent"] += 1
    run.in_flight += 1
    run.peak_in_flight = max(run.peak_in_flight, run.in_flight)
    task = asyncio.create_task(_send(run, tally, request, output_tokens, due))
    run.tasks.add(task)
    task.add_done_callback(functools.partial(_finished, run, tally))
    run.progress()


async def _send(
    run: ReplayState, tally: Tally, request: TraceRequest, output_tokens: int, due: float
) -> _Answer:
    """Record the send lag, then post the run."""
    lag_ms = (asyncio.get_running_loop().time() - due) * 1000.0
    tally.send_lags_ms.append(lag_ms)
    if lag_ms > run.bounds.late_tolerance_s * 1000.0:
        tally.late += 1
        run.counts["late"] += 1
    return await _post_run(tally.client, tally.handle, request, output_tokens)


def _finished(run: ReplayState, tally: Tally, task: asyncio.Task[_Answer]) -> None:
    """Count a send's outcome and free its slots (a done callback: runs however it ended)."""
    run.tasks.discard(task)
    tally.in_flight -= 1
    run.in_flight -= 1
    tally.bound.give()
    run.bound.give()
    if task.cancelled():
        outcome: _Outcome = "unfinished"
        tally.unfinished += 1
    elif task.exception() is not None:  # a fault of the replay itself, not of the server
        outcome = "failed"
        tally.failed += 1
        tally.error_codes["client_error"] += 1
    else:
        outcome, code, (tokens_in, tokens_out), latency_ms = task.result()
        if outcome == "completed":
            tally.completed += 1
            tally.tokens_in += tokens_in
            tally.tokens_out += tokens_out
            tally.latencies_ms.append(latency_ms)
        elif outcome == "throttled":
            tally.throttled += 1
        else:
            tally.failed += 1
        if code is not None:
            tally.error_codes[code] += 1
    run.counts[outcome] += 1
    run.progress()


async def wait_until(deadline: float, tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Wait until every task is done or the event-loop clock reaches ``deadline``."""
    pending = set(tasks)
    timeout = deadline - asyncio.get_running_loop().time()
    if pending and timeout > 0:
        await asyncio.wait(pending, timeout=timeout)


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> list[BaseException | Any]:
    """Cancel the tasks still running and wait for all of them; their results or errors."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    return await asyncio.gather(*tasks, return_exceptions=True)


def check_accounting(tallies: Mapping[str, Tally]) -> None:
    """Every request is accounted for, per tenant. Raised even under ``python -O``."""
    for source, t in tallies.items():
        outcomes = t.completed + t.throttled + t.failed + t.unfinished
        held = t.bound.used + t.in_flight
        if t.sent != outcomes or t.scheduled != t.sent + t.dropped or held != 0:
            raise AssertionError(
                f"replay accounting broken for {source!r}: scheduled={t.scheduled} sent={t.sent} "
                f"completed={t.completed} throttled={t.throttled} failed={t.failed} "
                f"unfinished={t.unfinished} dropped={t.dropped} still held={held}"
            )


def tenant_client(
    base_url: str,
    handle: TenantHandle,
    *,
    pool_size: int,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None,
) -> httpx.AsyncClient:
    """One tenant's client: its own pool, as many connections as it may have requests in
    flight, so a request never queues for a connection (httpx's pool does work per queued
    request on every change, which a long queue turns quadratic)."""
    return httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        timeout=timeout_s,
        limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
        headers={"Authorization": f"Bearer {handle.key}"},
    )
