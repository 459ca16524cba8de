"""Replay a trace against a running Patinox server over HTTP, one tenant per trace source.

:func:`onboard` creates, per source, a tenant, an API key and one agent through the admin
and tenant APIs; :func:`replay` then sends every :class:`~patinox.replay.traces.TraceRequest`
as a run of that source's agent at its (compressed) trace time, concurrently, without
retries, and returns a :class:`ReplayReport`. This module is an HTTP client only: it
imports nothing of the server.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict
from rich.table import Table

from patinox.errors import ConfigurationError, OperationFailed
from patinox.replay.traces import TraceRequest

__all__ = [
    "PERCENTILE_METHOD",
    "ProgressCallback",
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

_PLANS: frozenset[str] = frozenset({"free", "pro", "enterprise"})
_KEY_SCOPES = ["agents:write", "runs:write", "read"]
_THROTTLE_STATUS = 429
_Outcome = Literal["completed", "throttled", "failed"]

PERCENTILE_METHOD = "nearest-rank"
"""How p50/p99 are computed: the value at rank ceil(p/100 * n) of the n sorted samples."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TenantHandle:
    """What the replay needs to act as one source's tenant.

    Attributes:
        source: trace source name, e.g. ``"azure-code"``.
        tenant_id: id the server gave the tenant.
        plan: the tenant's plan (``free``, ``pro`` or ``enterprise``).
        key: the tenant API key secret (left out of ``repr``).
        agent_id: the agent every run of this source uses.
        model: the agent's model id (``"simulated"`` is the offline simulated model).
    """

    source: str
    tenant_id: str
    plan: str
    key: str = field(repr=False)
    agent_id: str
    model: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayProgress:
    """A snapshot for progress displays; counts are requests.

    ``sent`` counts requests handed to the HTTP client, ``finished`` those answered or
    failed; ``completed + throttled + failed == finished``.
    """

    total: int
    sent: int
    finished: int
    completed: int
    throttled: int
    failed: int


ProgressCallback = Callable[[ReplayProgress], None]
"""Called on every send and every finish, from the event loop; keep it quick."""


class TenantReport(BaseModel):
    """One tenant's outcome. Latencies in milliseconds, tokens as the server reported."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    source: str
    plan: str
    model: str
    sent: int
    completed: int
    throttled: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    tokens_in: int
    tokens_out: int
    error_codes: dict[str, int]


class ReplayReport(BaseModel):
    """The outcome of one replay.

    Attributes:
        trace: name of the replayed trace.
        compression: trace seconds per wall second (2.0 replays twice as fast).
        wall_time_s: wall time from the first scheduled send to the last answer, seconds.
        trace_duration_s: trace time covered, seconds (offset of the last request).
        max_output_tokens: the cap applied to requested output tokens, or None.
        clamped_requests: requests whose output tokens were lowered to that cap.
        max_send_lag_ms: worst delay between a request's due time and its send, ms.
        percentile_method: how ``p50_ms``/``p99_ms`` are computed.
        tenants: per-tenant outcomes, ordered by source.
    """

    model_config = ConfigDict(frozen=True)

    trace: str
    compression: float
    wall_time_s: float
    trace_duration_s: float
    max_output_tokens: int | None
    clamped_requests: int
    max_send_lag_ms: float
    percentile_method: str = PERCENTILE_METHOD
    tenants: list[TenantReport]

    def to_json(self, *, indent: int | None = 2) -> str:
        """The report as JSON text (percentiles are ``null`` without completions)."""
        return self.model_dump_json(indent=indent)


def percentile(samples: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile.

    Args:
        samples: values in any order.
        p: percentile in (0, 100].

    Returns:
        The value at 1-based rank ``ceil(p/100 * n)`` of the sorted samples, or None when
        there are none.
    """
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {p}")
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


# --- onboarding -------------------------------------------------------------------------


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """(code, message) of an error response; ``http_<status>`` when the body has none."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = error.get("code")
        if isinstance(code, str) and code:
            return code, str(error.get("message", ""))
    return f"http_{response.status_code}", response.text[:200]


def _created(response: httpx.Response, step: str, source: str) -> dict[str, Any]:
    """The JSON body of a ``201 Created``.

    Raises:
        OperationFailed: any other answer (fields: step, source, status_code, error_code).
    """
    if response.status_code == httpx.codes.CREATED:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            return body
    code, message = _error_of(response)
    raise OperationFailed(
        f"onboarding {source!r}: {step} answered HTTP {response.status_code} {code}: {message}",
        step=step,
        source=source,
        status_code=response.status_code,
        error_code=code,
    )


async def _onboard_one(
    admin: httpx.AsyncClient, source: str, plan: str, *, model: str, name_prefix: str
) -> TenantHandle:
    name = f"{name_prefix}{source}"
    tenant = _created(
        await admin.post("/admin/tenants", json={"name": name, "plan": plan}),
        "create tenant",
        source,
    )
    tenant_id: str = tenant["id"]
    key_body = _created(
        await admin.post(
            f"/admin/tenants/{tenant_id}/keys",
            json={"name": f"replay-{source}", "scopes": list(_KEY_SCOPES)},
        ),
        "create key",
        source,
    )
    secret = key_body.get("key")
    if not isinstance(secret, str) or not secret:
        raise OperationFailed(
            f"onboarding {source!r}: create key returned no secret",
            step="create key",
            source=source,
        )
    agent = _created(
        await admin.post(
            "/v1/agents",
            headers={"Authorization": f"Bearer {secret}"},
            json={
                "name": f"replay-{source}",
                "instructions": f"Replay agent for trace source {source}.",
                "model": model,
                "tools": [],
            },
        ),
        "create agent",
        source,
    )
    return TenantHandle(
        source=source, tenant_id=tenant_id, plan=plan, key=secret, agent_id=agent["id"], model=model
    )


async def onboard(
    base_url: str,
    admin_key: str,
    sources: Mapping[str, str],
    *,
    model: str,
    name_prefix: str,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout_s: float = 30.0,
) -> dict[str, TenantHandle]:
    """Create a tenant, an API key and one agent per trace source.

    Sources are onboarded concurrently. Nothing is rolled back when one fails: tenants
    already created stay (named ``<name_prefix><source>``), so use a fresh prefix per run.

    Args:
        base_url: server root, e.g. ``"http://127.0.0.1:8000"``.
        admin_key: an operator API key.
        sources: source name -> plan (``free``, ``pro`` or ``enterprise``).
        model: model id of every agent, e.g. ``"simulated"``.
        name_prefix: tenant names are ``<name_prefix><source>``.
        transport: an httpx transport to use instead of the network (tests).
        timeout_s: per-request timeout, seconds.

    Returns:
        Source name -> :class:`TenantHandle`.

    Raises:
        ConfigurationError: an unknown plan.
        OperationFailed: the server refused a step (the message names source, step,
            status and error code).
        httpx.TransportError: the server could not be reached.
    """
    bad = {s: p for s, p in sources.items() if p not in _PLANS}
    if bad:
        raise ConfigurationError(f"unknown plan(s) {bad}; plans are {sorted(_PLANS)}")
    async with httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        timeout=timeout_s,
        headers={"Authorization": f"Bearer {admin_key}"},
    ) as admin:
        handles = await asyncio.gather(
            *(_onboard_one(admin, s, p, model=model, name_prefix=name_prefix) for s, p in sources.items())
        )
    return {h.source: h for h in handles}


# --- replay -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    """Mutable per-tenant counters; only touched from the event loop."""

    handle: TenantHandle
    sent: int = 0
    completed: int = 0
    throttled: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    error_codes: Counter[str] = field(default_factory=Counter)

    def report(self, source: str) -> TenantReport:
        return TenantReport(
            tenant_id=self.handle.tenant_id,
            source=source,
            plan=self.handle.plan,
            model=self.handle.model,
            sent=self.sent,
            completed=self.completed,
            throttled=self.throttled,
            failed=self.failed,
            p50_ms=percentile(self.latencies_ms, 50),
            p99_ms=percentile(self.latencies_ms, 99),
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            error_codes=dict(sorted(self.error_codes.items())),
        )


@dataclass(slots=True)
class _Run:
    """Shared state of one replay; only touched from the event loop."""

    client: httpx.AsyncClient
    total: int
    on_progress: ProgressCallback | None
    sent: int = 0
    outcomes: Counter[_Outcome] = field(default_factory=Counter)
    max_lag_s: float = 0.0

    def progress(self) -> None:
        if self.on_progress is None:
            return
        o = self.outcomes
        self.on_progress(
            ReplayProgress(
                total=self.total,
                sent=self.sent,
                finished=o.total(),
                completed=o["completed"],
                throttled=o["throttled"],
                failed=o["failed"],
            )
        )


def prompt_of(words: int) -> str:
    """A prompt of exactly ``words`` whitespace-separated words (the simulated tokenizer
    counts one token per word)."""
    return " ".join(["token"] * words)


def _classify(response: httpx.Response) -> tuple[_Outcome, str | None, tuple[int, int]]:
    """(outcome, error code or None, (input tokens, output tokens)) of one answer."""
    if response.status_code == _THROTTLE_STATUS:
        return "throttled", _error_of(response)[0], (0, 0)
    if not response.is_success:
        return "failed", _error_of(response)[0], (0, 0)
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
    run: _Run, handle: TenantHandle, request: TraceRequest, output_tokens: int
) -> tuple[_Outcome, str | None, tuple[int, int], float]:
    """(outcome, error code, tokens, latency ms) of one run; never raises for HTTP or
    transport failures."""
    started = time.perf_counter()
    try:
        response = await run.client.post(
            f"/v1/agents/{handle.agent_id}/runs",
            headers={"Authorization": f"Bearer {handle.key}"},
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


async def _send(run: _Run, tally: _Tally, request: TraceRequest, output_tokens: int, due: float) -> None:
    """Send one run and count its outcome in the tenant's tally and the run totals."""
    run.max_lag_s = max(run.max_lag_s, asyncio.get_running_loop().time() - due)
    tally.sent += 1
    run.sent += 1
    run.progress()
    outcome, code, (tokens_in, tokens_out), latency_ms = await _post_run(
        run, tally.handle, request, output_tokens
    )
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
    run.outcomes[outcome] += 1
    run.progress()


def _check_accounting(tallies: Mapping[str, _Tally], expected: Counter[str]) -> None:
    """Every request is accounted for, per tenant. Raised even under ``python -O``."""
    for source, t in tallies.items():
        if t.sent != t.completed + t.throttled + t.failed or t.sent != expected[source]:
            raise AssertionError(
                f"replay accounting broken for {source!r}: sent={t.sent} "
                f"completed={t.completed} throttled={t.throttled} failed={t.failed} "
                f"expected={expected[source]}"
            )


async def replay(
    base_url: str,
    handles: Mapping[str, TenantHandle],
    requests: Sequence[TraceRequest],
    *,
    compression: float,
    max_output_tokens: int | None = None,
    on_progress: ProgressCallback | None = None,
    trace: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout_s: float = 300.0,
    max_connections: int = 256,
) -> ReplayReport:
    """Replay ``requests`` as agent runs, each at its trace time divided by ``compression``.

    Sends are scheduled by absolute time from one start instant (request ``i`` is sent
    ``offset_s / compression`` seconds after the start, never earlier), so lateness does
    not accumulate; they are fired concurrently, not waiting for earlier answers. Each
    run's input is exactly ``prompt_tokens`` whitespace-separated words and asks for the
    request's real ``output_tokens`` (lowered to ``max_output_tokens`` when given; the
    report counts how many were). Nothing is retried: a 429 counts as throttled; any
    other non-2xx, a 2xx whose run did not succeed, a transport error or a timeout counts
    as failed, with its error code (``error.code`` of the body, else ``http_<status>``,
    ``timeout``, ``connect_error``, ``transport_error``, ``bad_response``).

    Latency is client wall time of completed runs, including any wait for one of the
    ``max_connections`` connections; p50/p99 use the nearest-rank method.

    Args:
        base_url: server root, e.g. ``"http://127.0.0.1:8000"``.
        handles: source name -> tenant handle, from :func:`onboard`.
        requests: the trace; every source must have a handle.
        compression: trace seconds per wall second (> 0; 10.0 replays 10x faster).
        max_output_tokens: cap on requested output tokens per run, or None.
        on_progress: called with a :class:`ReplayProgress` on every send and finish.
        trace: name recorded in the report; the sources joined by ``+`` when None.
        transport: an httpx transport to use instead of the network (tests).
        timeout_s: per-request timeout, seconds.
        max_connections: most concurrent HTTP connections.

    Returns:
        The :class:`ReplayReport`, with every handle as a tenant row (sent 0 if the trace
        has none of its requests).

    Raises:
        ConfigurationError: a source without a handle, or an invalid option.
        AssertionError: the per-tenant accounting does not add up (a bug).
    """
    if not (math.isfinite(compression) and compression > 0):
        raise ConfigurationError(f"compression must be finite and > 0, not {compression}")
    if max_output_tokens is not None and max_output_tokens < 1:
        raise ConfigurationError(f"max_output_tokens must be >= 1, not {max_output_tokens}")
    expected = Counter(r.source for r in requests)
    missing = sorted(set(expected) - set(handles))
    if missing:
        raise ConfigurationError(f"no tenant handle for source(s) {missing}; onboard them first")

    ordered = sorted(requests, key=lambda r: r.offset_s)
    tallies = {s: _Tally(handle=h) for s, h in sorted(handles.items())}
    clamped = 0
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(
        base_url=base_url, transport=transport, timeout=timeout_s, limits=limits
    ) as client:
        run = _Run(client=client, total=len(ordered), on_progress=on_progress)
        run.progress()
        start = loop.time()
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for request in ordered:
                due = start + request.offset_s / compression
                while (delay := due - loop.time()) > 0:
                    await asyncio.sleep(delay)
                output_tokens = request.output_tokens
                if max_output_tokens is not None and output_tokens > max_output_tokens:
                    output_tokens = max_output_tokens
                    clamped += 1
                group.create_task(_send(run, tallies[request.source], request, output_tokens, due))
        wall_time_s = time.perf_counter() - started

    _check_accounting(tallies, expected)
    return ReplayReport(
        trace=trace if trace is not None else "+".join(sorted(expected)),
        compression=compression,
        wall_time_s=wall_time_s,
        trace_duration_s=ordered[-1].offset_s if ordered else 0.0,
        max_output_tokens=max_output_tokens,
        clamped_requests=clamped,
        max_send_lag_ms=run.max_lag_s * 1000.0,
        tenants=[t.report(source) for source, t in tallies.items()],
    )


# --- display ----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def render_table(report: ReplayReport) -> Table:
    """The per-tenant results as a Rich table, with the replay's settings in the caption.

    Made to be read at 80 columns: one row per tenant named by its trace source (tenant ids
    are in the JSON report), numbers never wrapped, latencies in whole milliseconds, and the
    error codes listed under the table. Source and plan names fold when space runs out.
    """
    from rich import box
    from rich.text import Text

    table = Table(
        title=(
            f"Replay of {report.trace} at {report.compression:g}x: "
            f"{report.trace_duration_s:,.1f} s of trace in {report.wall_time_s:,.1f} s"
        ),
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        caption_justify="left",
    )
    table.add_column("source", overflow="fold", min_width=6)
    table.add_column("plan", overflow="fold", min_width=4)
    for name in ("sent", "ok", "429", "failed", "p50\nms", "p99\nms", "tokens\nin", "tokens\nout"):
        table.add_column(name, justify="right", no_wrap=True)

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    errors = []
    for t in report.tenants:
        table.add_row(
            Text(t.source),
            Text(t.plan),
            f"{t.sent:,}",
            f"{t.completed:,}",
            f"{t.throttled:,}",
            f"{t.failed:,}",
            ms(t.p50_ms),
            ms(t.p99_ms),
            f"{t.tokens_in:,}",
            f"{t.tokens_out:,}",
        )
        if t.error_codes:
            codes = ", ".join(f"{code}={n:,}" for code, n in t.error_codes.items())
            errors.append(f"errors of {t.source}: {codes}")
    notes = [
        *errors,
        "ok: completed; 429: throttled; latency (ms): client wall time of completed runs, "
        f"{report.percentile_method} percentiles; max send lag {report.max_send_lag_ms:,.1f} ms",
    ]
    if report.max_output_tokens is not None:
        notes.append(
            f"output tokens capped at {report.max_output_tokens:,} "
            f"({report.clamped_requests:,} requests lowered)"
        )
    models = sorted({t.model for t in report.tenants})
    if "simulated" in models:
        notes.append("model: simulated (offline simulated model, no real LLM)")
    elif models:
        notes.append(f"model: {', '.join(models)}")
    table.caption = Text("\n".join(notes))
    return table
