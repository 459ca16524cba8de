"""Replay a trace against a running Patinox server over HTTP, one tenant per trace source.

:func:`onboard` creates, per source, a tenant, an API key and one agent through the admin
and tenant APIs; :func:`replay` then sends every :class:`~patinox.replay.traces.TraceRequest`
as a run of that source's agent at its (compressed) trace time and returns a
:class:`ReplayReport`. The replay is an open-loop load generator that stays bounded when the
server cannot keep up (see :class:`ReplayBounds`): requests in flight are capped per tenant
and in total, a request that cannot be sent in time is dropped and counted, and the run ends
at a deadline. This module is an HTTP client only: it imports nothing of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, computed_field, model_validator
from rich.console import Group, RenderableType
from rich.table import Table

from patinox.errors import ConfigurationError, OperationFailed
from patinox.replay._bound import InFlightBound
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

_PLANS: frozenset[str] = frozenset({"free", "pro", "enterprise"})
_KEY_SCOPES = ["agents:write", "runs:write", "read"]
_THROTTLE_STATUS = 429
_Outcome = Literal["completed", "throttled", "failed", "unfinished"]
_DropReason = Literal["tenant_in_flight", "total_in_flight", "deadline"]

PERCENTILE_METHOD = "nearest-rank"
"""How p50/p99 are computed: the value at rank ceil(p/100 * n) of the n sorted samples."""

ACCOUNTING = (
    "scheduled = completed + throttled + failed + unfinished + dropped, per tenant and in total; "
    "sent = scheduled - dropped; late counts sent requests (whatever their outcome) whose send "
    "lag exceeded late_tolerance_s"
)
"""The identity every :class:`TenantReport` (and the totals) satisfies; also in the JSON."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayBounds:
    """How far a replay lets a server that cannot keep up hold it back.

    The replay stays open-loop (a request is due at its trace time whatever happened to
    earlier ones) and bounded: it never holds more than these many requests in flight, and
    a request that cannot be sent in time is dropped and counted instead of queued.

    Attributes:
        max_in_flight: most requests sent and not yet finished, over all tenants (>= 1).
        max_in_flight_per_tenant: most in flight for one tenant (>= 1). Each tenant has its
            own HTTP client whose pool has this many connections (at most
            ``max_in_flight``), so a request handed to the client never waits for a
            connection behind another tenant's requests.
        late_tolerance_s: wall seconds (>= 0) a request may leave after its due time. A
            request with no free slot waits for one until then and is ``dropped`` if none
            comes; one sent later than this all the same (its slot came free in time but the
            busy event loop sent it a moment later, or the replay fell behind its schedule)
            is counted ``late``.
        drain_timeout_s: wall seconds (>= 0) the replay waits after the last request's due
            time for answers; requests still in flight then are cancelled (``unfinished``).
            The run so ends ``trace_duration_s / compression + drain_timeout_s`` after it
            started, plus the moment it takes to cancel and close connections.

    Raises:
        ConfigurationError: a bound below 1 or not an integer, a negative or non-finite
            number of seconds.
    """

    max_in_flight: int = 256
    max_in_flight_per_tenant: int = 64
    late_tolerance_s: float = 1.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_in_flight_per_tenant"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, not {value!r}")
        for name in ("late_tolerance_s", "drain_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"{name} must be finite and >= 0, not {value!r}")

    @property
    def pool_size(self) -> int:
        """Connections (and requests in flight) per tenant: the smaller of the two bounds."""
        return min(self.max_in_flight, self.max_in_flight_per_tenant)


_DEFAULT_BOUNDS = ReplayBounds()


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

    ``sent`` counts requests handed to the HTTP client, ``finished`` those of them that are
    over (``completed + throttled + failed + unfinished``), ``dropped`` those never sent;
    at the end ``finished + dropped == total``. ``late`` counts sent requests that left
    later than the tolerance (whatever their outcome).
    """

    total: int
    sent: int
    finished: int
    completed: int
    throttled: int
    failed: int
    dropped: int = 0
    unfinished: int = 0
    late: int = 0


ProgressCallback = Callable[[ReplayProgress], None]
"""Called on every send, finish and drop, from the event loop; keep it quick."""


class TenantReport(BaseModel):
    """One tenant's outcome. Latencies in milliseconds, tokens as the server reported.

    Every scheduled request is in exactly one of ``completed`` (2xx and the run
    succeeded), ``throttled`` (429), ``failed`` (any other answer, a run that did not
    succeed, a transport error or a client timeout), ``unfinished`` (sent, still in flight
    at the drain deadline, cancelled) and ``dropped`` (never sent: no in-flight slot came
    free by its due time plus the tolerance, or the deadline came first; the reasons are in
    ``dropped_reasons``: ``tenant_in_flight``, ``total_in_flight``, ``deadline``).
    ``late`` is not a category of its own: it counts sent requests whose send lag exceeded
    the tolerance, and each of them is also in its outcome. The model refuses figures that
    break this (:data:`ACCOUNTING`).

    ``p50_ms``/``p99_ms``: client wall time of completed runs. ``send_lag_*_ms``: how long
    after its due time each sent request left (p50, p99, max; None when none was sent).
    ``peak_in_flight``: the most of this tenant's requests sent and not yet over at once.
    """

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    source: str
    plan: str
    model: str
    scheduled: int
    sent: int
    completed: int
    throttled: int
    failed: int
    unfinished: int = 0
    dropped: int = 0
    late: int = 0
    p50_ms: float | None
    p99_ms: float | None
    send_lag_p50_ms: float | None = None
    send_lag_p99_ms: float | None = None
    send_lag_max_ms: float | None = None
    peak_in_flight: int = 0
    tokens_in: int
    tokens_out: int
    error_codes: dict[str, int]
    dropped_reasons: dict[str, int] = {}

    @model_validator(mode="before")
    @classmethod
    def _scheduled_defaults_to_sent_plus_dropped(cls, data: Any) -> Any:
        # reports written before requests could be dropped had no ``scheduled``
        if isinstance(data, dict) and "scheduled" not in data:
            return {**data, "scheduled": int(data.get("sent", 0)) + int(data.get("dropped", 0))}
        return data

    @model_validator(mode="after")
    def _every_request_accounted_for(self) -> TenantReport:
        outcomes = self.completed + self.throttled + self.failed + self.unfinished
        if (
            self.sent != outcomes
            or self.scheduled != self.sent + self.dropped
            or not 0 <= self.late <= self.sent
            or sum(self.dropped_reasons.values()) != self.dropped
        ):
            raise ValueError(
                f"replay accounting broken for {self.source!r}: scheduled={self.scheduled} "
                f"sent={self.sent} completed={self.completed} throttled={self.throttled} "
                f"failed={self.failed} unfinished={self.unfinished} dropped={self.dropped} "
                f"({self.dropped_reasons}) late={self.late}; expected {ACCOUNTING}"
            )
        return self


_TOTALLED = ("scheduled", "sent", "completed", "throttled", "failed", "unfinished", "dropped", "late")


class ReplayReport(BaseModel):
    """The outcome of one replay.

    Attributes:
        trace: name of the replayed trace.
        compression: trace seconds per wall second (2.0 replays twice as fast).
        wall_time_s: wall time from the first scheduled send until every request was
            accounted for, seconds.
        trace_duration_s: trace time covered, seconds (offset of the last request).
        max_output_tokens: the cap applied to requested output tokens, or None.
        clamped_requests: sent requests whose output tokens were lowered to that cap.
        max_send_lag_ms: worst delay between a request's due time and its send, over all
            tenants, ms (0 when nothing was sent).
        max_in_flight, max_in_flight_per_tenant, late_tolerance_s, drain_timeout_s: the
            :class:`ReplayBounds` of the run.
        peak_in_flight: the most requests in flight at once, all tenants together.
        percentile_method: how ``p50_ms``/``p99_ms`` and the send-lag percentiles are
            computed.
        accounting: :data:`ACCOUNTING`, the identity the counts satisfy.
        tenants: per-tenant outcomes, ordered by source.
        totals (computed): the per-tenant counts summed, keyed by category.
        deadline_s (computed): ``trace_duration_s / compression + drain_timeout_s``, when
            requests still in flight were cancelled, seconds after the start.
    """

    model_config = ConfigDict(frozen=True)

    trace: str
    compression: float
    wall_time_s: float
    trace_duration_s: float
    max_output_tokens: int | None
    clamped_requests: int
    max_send_lag_ms: float
    max_in_flight: int = _DEFAULT_BOUNDS.max_in_flight
    max_in_flight_per_tenant: int = _DEFAULT_BOUNDS.max_in_flight_per_tenant
    late_tolerance_s: float = _DEFAULT_BOUNDS.late_tolerance_s
    drain_timeout_s: float = _DEFAULT_BOUNDS.drain_timeout_s
    peak_in_flight: int = 0
    percentile_method: str = PERCENTILE_METHOD
    accounting: str = ACCOUNTING
    tenants: list[TenantReport]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def deadline_s(self) -> float:
        """When requests still in flight were cancelled, seconds after the start."""
        return self.trace_duration_s / self.compression + self.drain_timeout_s

    @computed_field  # type: ignore[prop-decorator]
    @property
    def totals(self) -> dict[str, int]:
        """Each count of :class:`TenantReport` summed over the tenants."""
        return {name: sum(getattr(t, name) for t in self.tenants) for name in _TOTALLED}

    def to_json(self, *, indent: int | None = 2) -> str:
        """The report as JSON text (percentiles are ``null`` without samples)."""
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

_Answer = tuple[_Outcome, str | None, tuple[int, int], float]
"""(outcome, error code or None, (input tokens, output tokens), latency ms) of one run."""


@dataclass(slots=True)
class _Tally:
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
class _Run:
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


def _drop(run: _Run, tally: _Tally, reason: _DropReason, n: int = 1) -> None:
    if n > 0:
        tally.dropped_reasons[reason] += n
        run.counts["dropped"] += n
        run.progress()


async def _take_slots(run: _Run, tally: _Tally, give_up: float) -> _DropReason | None:
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


async def _dispatch(run: _Run, tally: _Tally, requests: Sequence[TraceRequest]) -> None:
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


def _launch(run: _Run, tally: _Tally, request: TraceRequest, due: float) -> None:
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


async def _send(run: _Run, tally: _Tally, request: TraceRequest, output_tokens: int, due: float) -> _Answer:
    """Record the send lag, then post the run."""
    lag_ms = (asyncio.get_running_loop().time() - due) * 1000.0
    tally.send_lags_ms.append(lag_ms)
    if lag_ms > run.bounds.late_tolerance_s * 1000.0:
        tally.late += 1
        run.counts["late"] += 1
    return await _post_run(tally.client, tally.handle, request, output_tokens)


def _finished(run: _Run, tally: _Tally, task: asyncio.Task[_Answer]) -> None:
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


async def _wait_until(deadline: float, tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Wait until every task is done or the event-loop clock reaches ``deadline``."""
    pending = set(tasks)
    timeout = deadline - asyncio.get_running_loop().time()
    if pending and timeout > 0:
        await asyncio.wait(pending, timeout=timeout)


async def _cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> list[BaseException | Any]:
    """Cancel the tasks still running and wait for all of them; their results or errors."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    return await asyncio.gather(*tasks, return_exceptions=True)


def _check_accounting(tallies: Mapping[str, _Tally]) -> None:
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


def _tenant_client(
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
    bounds = _DEFAULT_BOUNDS if bounds is None else bounds
    _validate(compression, max_output_tokens, timeout_s, bounds)
    by_source: dict[str, list[TraceRequest]] = {}
    for request in sorted(requests, key=lambda r: r.offset_s):
        by_source.setdefault(request.source, []).append(request)
    missing = sorted(set(by_source) - set(handles))
    if missing:
        raise ConfigurationError(f"no tenant handle for source(s) {missing}; onboard them first")
    trace_duration_s = max((r.offset_s for r in requests), default=0.0)

    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        tallies: dict[str, _Tally] = {}
        for source, handle in sorted(handles.items()):
            client = _tenant_client(
                base_url, handle, pool_size=bounds.pool_size, timeout_s=timeout_s, transport=transport
            )
            tallies[source] = _Tally(
                handle=handle,
                client=await stack.enter_async_context(client),
                bound=InFlightBound(bounds.pool_size),
                scheduled=len(by_source.get(source, ())),
            )
        run = _Run(
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
        dispatchers = [asyncio.create_task(_dispatch(run, tallies[s], rs)) for s, rs in by_source.items()]
        try:
            await _wait_until(deadline, dispatchers)
            await _wait_until(deadline, run.tasks)
        finally:
            dispatched = await _cancel_all(dispatchers)
            await _cancel_all(run.tasks)
        wall_time_s = time.perf_counter() - started
    for result in dispatched:
        if isinstance(result, Exception):
            raise result

    _check_accounting(tallies)
    lags = [lag for t in tallies.values() for lag in t.send_lags_ms]
    return ReplayReport(
        trace=trace if trace is not None else "+".join(sorted(by_source)),
        compression=compression,
        wall_time_s=wall_time_s,
        trace_duration_s=trace_duration_s,
        max_output_tokens=max_output_tokens,
        clamped_requests=run.clamped,
        max_send_lag_ms=max(lags, default=0.0),
        max_in_flight=bounds.max_in_flight,
        max_in_flight_per_tenant=bounds.max_in_flight_per_tenant,
        late_tolerance_s=bounds.late_tolerance_s,
        drain_timeout_s=bounds.drain_timeout_s,
        peak_in_flight=run.peak_in_flight,
        tenants=[t.report(source) for source, t in tallies.items()],
    )


# --- display ----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _table(title: str | None) -> Table:
    from rich import box

    return Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        caption_justify="left",
    )


def _notes(report: ReplayReport) -> list[str]:
    tolerance = f"{report.late_tolerance_s:g} s"
    notes = []
    for t in report.tenants:
        if t.error_codes:
            codes = ", ".join(f"{code}={n:,}" for code, n in t.error_codes.items())
            notes.append(f"errors of {t.source}: {codes}")
        if t.dropped_reasons:
            reasons = ", ".join(f"{reason}={n:,}" for reason, n in t.dropped_reasons.items())
            notes.append(f"dropped of {t.source}: {reasons}")
    notes += [
        "ok: completed; 429: throttled; latency (ms): client wall time of completed runs, "
        f"{report.percentile_method} percentiles",
        "sched = ok + 429 + failed + unfin + dropped; sent = sched - dropped; dropped: never "
        f"sent (no in-flight slot within {tolerance} of its due time, or the deadline came); "
        f"unfin: in flight at the drain deadline ({report.drain_timeout_s:g} s after the last "
        f"due time), cancelled; late: sent over {tolerance} after its due time (also counted "
        "in its outcome); lag: due time to send (ms)",
        f"in flight at most {report.max_in_flight:,} ({report.max_in_flight_per_tenant:,} per "
        f"tenant), peak {report.peak_in_flight:,}; max send lag {report.max_send_lag_ms:,.1f} ms",
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
    return notes


def render_table(report: ReplayReport) -> RenderableType:
    """The per-tenant results as two Rich tables, with the replay's settings below them.

    The first holds outcomes, latencies and tokens; the second what the replay scheduled,
    dropped and sent late, the tenant's peak in flight and its send lag. Made to be read at
    80 columns: one row per tenant named by its trace source (tenant ids are in the JSON
    report), numbers never wrapped, milliseconds whole, error codes and drop reasons listed
    under the tables. Source and plan names fold when space runs out.
    """
    from rich.text import Text

    outcomes = _table(
        f"Replay of {report.trace} at {report.compression:g}x: "
        f"{report.trace_duration_s:,.1f} s of trace in {report.wall_time_s:,.1f} s"
    )
    outcomes.add_column("source", overflow="fold", min_width=6)
    outcomes.add_column("plan", overflow="fold", min_width=4)
    for name in ("sent", "ok", "429", "failed", "p50\nms", "p99\nms", "tokens\nin", "tokens\nout"):
        outcomes.add_column(name, justify="right", no_wrap=True)
    sending = _table(None)
    sending.add_column("source", overflow="fold", min_width=6)
    for name in ("sched", "dropped", "late", "unfin", "peak\nin flight", "lag\np50", "lag\np99", "lag\nmax"):
        sending.add_column(name, justify="right", no_wrap=True)
    for t in report.tenants:
        outcomes.add_row(
            Text(t.source),
            Text(t.plan),
            f"{t.sent:,}",
            f"{t.completed:,}",
            f"{t.throttled:,}",
            f"{t.failed:,}",
            _ms(t.p50_ms),
            _ms(t.p99_ms),
            f"{t.tokens_in:,}",
            f"{t.tokens_out:,}",
        )
        sending.add_row(
            Text(t.source),
            f"{t.scheduled:,}",
            f"{t.dropped:,}",
            f"{t.late:,}",
            f"{t.unfinished:,}",
            f"{t.peak_in_flight:,}",
            _ms(t.send_lag_p50_ms),
            _ms(t.send_lag_p99_ms),
            _ms(t.send_lag_max_ms),
        )
    return Group(outcomes, Text(""), sending, Text("\n".join(_notes(report))))
