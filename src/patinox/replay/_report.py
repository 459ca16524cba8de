"""What a replay reports: per-tenant counts that every scheduled request is in exactly once
(:data:`ACCOUNTING`), latencies and send lags as nearest-rank percentiles, and the
progress snapshots shown while it runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, computed_field, model_validator

from patinox.replay._bound import DEFAULT_BOUNDS

PERCENTILE_METHOD = "nearest-rank"
"""How p50/p99 are computed: the value at rank ceil(p/100 * n) of the n sorted samples."""

ACCOUNTING = (
    "scheduled = completed + throttled + failed + unfinished + dropped, per tenant and in total; "
    "sent = scheduled - dropped; late counts sent requests (whatever their outcome) whose send "
    "lag exceeded late_tolerance_s"
)
"""The identity every :class:`TenantReport` (and the totals) satisfies; also in the JSON."""


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
    max_in_flight: int = DEFAULT_BOUNDS.max_in_flight
    max_in_flight_per_tenant: int = DEFAULT_BOUNDS.max_in_flight_per_tenant
    late_tolerance_s: float = DEFAULT_BOUNDS.late_tolerance_s
    drain_timeout_s: float = DEFAULT_BOUNDS.drain_timeout_s
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
