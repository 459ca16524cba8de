"""Replay a trace against a running Patinox server over HTTP, one tenant per trace source.

:func:`onboard` creates, per source, a tenant, an API key and one agent through the admin
and tenant APIs; :func:`replay` then sends every :class:`~patinox.replay.traces.TraceRequest`
as a run of that source's agent at its (compressed) trace time and returns a
:class:`ReplayReport`. The replay is an open-loop load generator that stays bounded when the
server cannot keep up (see :class:`ReplayBounds`): requests in flight are capped per tenant
and in total, a request that cannot be sent in time is dropped and counted, and the run ends
at a deadline. This module is an HTTP client only: it imports nothing of the server.

It schedules the trace (requests grouped by source, due times, the deadline) and holds the
public names; the parts live by job: the bounds in :mod:`._bound`, onboarding in
:mod:`._onboard`, the open-loop sender in :mod:`._send`, accounting and the report in
:mod:`._report`, the tables in :mod:`._display`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping, Sequence

import httpx

from patinox.errors import ConfigurationError
from patinox.replay._bound import DEFAULT_BOUNDS, InFlightBound, ReplayBounds
from patinox.replay._display import render_table
from patinox.replay._onboard import TenantHandle, onboard
from patinox.replay._report import (
    ACCOUNTING,
    PERCENTILE_METHOD,
    ProgressCallback,
    ReplayProgress,
    ReplayReport,
    TenantReport,
    percentile,
)
from patinox.replay._send import (
    ReplayState,
    Tally,
    cancel_all,
    check_accounting,
    dispatch,
    prompt_of,
    tenant_client,
    wait_until,
)
from patinox.replay.traces import TraceRequest

__all__ = [
    "ACCOUNTING",
    "PERCENTILE_METHOD",
    "ProgressCallback",
    "ReplayBounds",
    "ReplayProgress",
    "ReplayReport",
    "TenantHandle",
    "TenantReport",
    "onboard",
    "percentile",
    "prompt_of",
    "render_table",
    "replay",
]


def _validate(
    compression: float, max_output_tokens: int | None, timeout_s: float, bounds: ReplayBounds
) -> None:
    if not (math.isfinite(compression) and compression > 0):
        raise ConfigurationError(f"compression must be finite and > 0, not {compression}")
    if max_output_tokens is not None and max_output_tokens < 1:
        raise ConfigurationError(f"max_output_tokens must be >= 1, not {max_output_tokens}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigurationError(f"timeout_s must be finite and > 0, not {timeout_s}")
    if not isinstance(bounds, ReplayBounds):
        raise ConfigurationError(f"bounds must be a ReplayBounds, not {type(bounds).__name__}")


async def replay(
    base_url: str,
    handles: Mapping[str, TenantHandle],
    requests: Sequence[TraceRequest],
    *,
    compression: float,
    bounds: ReplayBounds | None = None,
    max_output_tokens: int | None = None,
    on_progress: ProgressCallback | None = None,
    trace: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout_s: float = 300.0,
) -> ReplayReport:
    """Replay ``requests`` as agent runs, each at its trace time divided by ``compression``.

    Open loop: request ``i`` is due ``offset_s / compression`` seconds after one start
    instant (never sent earlier, lateness does not accumulate) whatever became of earlier
    requests; each tenant's requests leave in trace order. Bounded: a request leaves only
    while fewer than ``bounds.max_in_flight_per_tenant`` of its tenant's requests and fewer
    than ``bounds.max_in_flight`` in all are in flight; with no free slot it waits until its
    due time plus ``bounds.late_tolerance_s`` and is then ``dropped``, never queued longer.
    Each tenant has its own HTTP client with a pool of that tenant's bound, so one
    tenant's requests never wait in another's pool. At ``trace_duration_s / compression +
    bounds.drain_timeout_s`` after the start, requests still in flight are cancelled
    (``unfinished``) and those not yet sent are dropped (reason ``deadline``): the run
    always ends then at the latest, and every request is accounted for (:data:`ACCOUNTING`).

    Each run's input is exactly ``prompt_tokens`` whitespace-separated words and asks for
    the request's real ``output_tokens`` (lowered to ``max_output_tokens`` when given; the
    report counts how many were). Nothing is retried: a 429 counts as throttled; any other
    non-2xx, a 2xx whose run did not succeed, a transport error or a timeout counts as
    failed, with its error code (``error.code`` of the body, else ``http_<status>``,
    ``timeout``, ``connect_error``, ``transport_error``, ``bad_response``).

    Latency is client wall time of completed runs, p50/p99 by the nearest-rank method. The
    send lag of a request is how long after its due time it was handed to the connection
    (per tenant p50, p99 and max); one sent more than ``late_tolerance_s`` after it (the
    event loop was busy, or the replay fell behind its schedule) counts as ``late``. A
    request that times out frees its slots, although the server may still be working on it.

    Args:
        base_url: server root, e.g. ``"http://127.0.0.1:8000"``.
        handles: source name -> tenant handle, from :func:`onboard`.
        requests: the trace; every source must have a handle.
        compression: trace seconds per wall second (> 0; 10.0 replays 10x faster).
        bounds: in-flight bounds, tolerance and drain timeout; :class:`ReplayBounds`
            defaults when None.
        max_output_tokens: cap on requested output tokens per run, or None.
        on_progress: called with a :class:`ReplayProgress` on every send, finish and drop.
        trace: name recorded in the report; the sources joined by ``+`` when None.
        transport: an httpx transport used by every tenant's client instead of the network
            (tests); the per-tenant pool sizes then do not apply.
        timeout_s: per-request timeout, seconds (> 0).

    Returns:
        The :class:`ReplayReport`, with every handle as a tenant row (scheduled 0 if the
        trace has none of its requests).

    Raises:
        ConfigurationError: a source without a handle, or an invalid option.
        AssertionError: the per-tenant accounting does not add up (a bug).
    """
    bounds = DEFAULT_BOUNDS if bounds is None else bounds
    _validate(compression, max_output_tokens, timeout_s, bounds)
    by_source = _by_source(requests, handles)
    trace_duration_s = max((r.offset_s for r in requests), default=0.0)

    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        tallies = await _open_tallies(
            stack, base_url, handles, by_source, bounds=bounds, timeout_s=timeout_s, transport=transport
        )
        run = ReplayState(
            bounds=bounds,
            bound=InFlightBound(bounds.max_in_flight),
            compression=compression,
            max_output_tokens=max_output_tokens,
            on_progress=on_progress,
            total=len(requests),
        )
        run.progress()
        run.start = loop.time()
        started = time.perf_counter()
        deadline = run.start + trace_duration_s / compression + bounds.drain_timeout_s
        dispatched = await _send_until(run, tallies, by_source, deadline)
        wall_time_s = time.perf_counter() - started
    for result in dispatched:
        if isinstance(result, Exception):
            raise result

    check_accounting(tallies)
    return _report_of(
        run,
        tallies,
        trace=trace if trace is not None else "+".join(sorted(by_source)),
        wall_time_s=wall_time_s,
        trace_duration_s=trace_duration_s,
    )


def _by_source(
    requests: Sequence[TraceRequest], handles: Mapping[str, TenantHandle]
) -> dict[str, list[TraceRequest]]:
    """Each source's requests in trace order, sources in order of their first request.

    Raises:
        ConfigurationError: a source without a handle.
    """
    by_source: dict[str, list[TraceRequest]] = {}
    for request in sorted(requests, key=lambda r: r.offset_s):
        by_source.setdefault(request.source, []).append(request)
    missing = sorted(set(by_source) - set(handles))
    if missing:
        raise ConfigurationError(f"no tenant handle for source(s) {missing}; onboard them first")
    return by_source


async def _open_tallies(
    stack: contextlib.AsyncExitStack,
    base_url: str,
    handles: Mapping[str, TenantHandle],
    by_source: Mapping[str, Sequence[TraceRequest]],
    *,
    bounds: ReplayBounds,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None,
) -> dict[str, Tally]:
    """One tally per handle, ordered by source, each with its own client (closed by
    ``stack``) and in-flight bound."""
    tallies: dict[str, Tally] = {}
    for source, handle in sorted(handles.items()):
        client = tenant_client(
            base_url, handle, pool_size=bounds.pool_size, timeout_s=timeout_s, transport=transport
        )
        tallies[source] = Tally(
            handle=handle,
            client=await stack.enter_async_context(client),
            bound=InFlightBound(bounds.pool_size),
            scheduled=len(by_source.get(source, ())),
        )
    return tallies


async def _send_until(
    run: ReplayState,
    tallies: Mapping[str, Tally],
    by_source: Mapping[str, Sequence[TraceRequest]],
    deadline: float,
) -> list[BaseException | None]:
    """Send every source's requests, then wait for their answers until ``deadline``
    (event-loop time, seconds) at the latest; cancel what is still in flight then.

    Returns:
        What each source's dispatcher ended with: None, or the error it raised (a
        cancellation at the deadline included).
    """
    dispatchers = [asyncio.create_task(dispatch(run, tallies[s], rs)) for s, rs in by_source.items()]
    try:
        await wait_until(deadline, dispatchers)
        await wait_until(deadline, run.tasks)
    finally:
        dispatched = await cancel_all(dispatchers)
        await cancel_all(run.tasks)
    return dispatched


def _report_of(
    run: ReplayState, tallies: Mapping[str, Tally], *, trace: str, wall_time_s: float, trace_duration_s: float
) -> ReplayReport:
    """The report of a finished replay whose accounting has been checked."""
    bounds = run.bounds
    lags = [lag for t in tallies.values() for lag in t.send_lags_ms]
    return ReplayReport(
        trace=trace,
        compression=run.compression,
        wall_time_s=wall_time_s,
        trace_duration_s=trace_duration_s,
        max_output_tokens=run.max_output_tokens,
        clamped_requests=run.clamped,
        max_send_lag_ms=max(lags, default=0.0),
        max_in_flight=bounds.max_in_flight,
        max_in_flight_per_tenant=bounds.max_in_flight_per_tenant,
        late_tolerance_s=bounds.late_tolerance_s,
        drain_timeout_s=bounds.drain_timeout_s,
        peak_in_flight=run.peak_in_flight,
        tenants=[t.report(source) for source, t in tallies.items()],
    )
