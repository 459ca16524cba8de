"""A replay's report as Rich tables, readable at 80 columns."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table

from patinox.replay._report import ReplayReport


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
