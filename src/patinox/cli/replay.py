"""``patinox replay``: replay a real public trace against a running server over HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from patinox.cli._output import console, fail, say
from patinox.errors import ConfigurationError
from patinox.replay import ReplayBounds, ReplayReport


def _plans(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        source, sep, plan = pair.partition("=")
        if not sep:
            fail(f"--plan takes SOURCE=PLAN, got {pair!r}")
        out[source.strip()] = plan.strip()
    return out


def run_replay(
    url: str,
    admin_key: str,
    *,
    trace: str,
    plans: dict[str, str],
    duration: float,
    compression: float,
    report_path: Path,
    model: str,
    traces_dir: Path | None,
    seed: int = 0,
    bounds: ReplayBounds | None = None,
) -> dict[str, Any]:
    """Onboard one tenant per trace source on the server at ``url``, replay ``duration``
    seconds of ``trace`` with a progress bar, print the table and write the JSON report.

    Returns:
        The report as written to ``report_path`` (parsed JSON).

    Raises:
        typer.Exit: no requests in that window, the server could not be reached or the
            report could not be written (after an ``error:`` line).
    """
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from patinox.replay import ReplayProgress, load_trace, onboard, render_table, replay

    requests = load_trace(trace, sources=list(plans), duration_s=duration, seed=seed, data_dir=traces_dir)
    if not requests:
        fail(f"no requests in the first {duration} s of {trace} for {sorted(plans)}")

    async def go() -> ReplayReport:
        prefix = f"replay-{int(time.time())}-"
        handles = await onboard(url, admin_key, plans, model=model, name_prefix=prefix)
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}", markup=False),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("replaying", total=len(requests), detail="")

            def on_progress(p: ReplayProgress) -> None:
                progress.update(
                    task,
                    completed=p.finished + p.dropped,
                    total=p.total,
                    detail=f"ok {p.completed} · 429 {p.throttled} · failed {p.failed} · dropped {p.dropped}",
                )

            return await replay(
                url,
                handles,
                requests,
                compression=compression,
                bounds=bounds,
                on_progress=on_progress,
                trace=trace,
            )

    try:
        report = asyncio.run(go())
    except httpx.ConnectError as err:
        fail(f"cannot connect to {url} ({err}); is `patinox serve` running there?")
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        fail(f"talking to {url} failed: {type(err).__name__}: {err}")
    console.print(render_table(report))
    data: dict[str, Any] = json.loads(report.to_json())
    try:
        report_path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as err:
        fail(f"cannot write the report to {report_path}: {err.strerror or err}")
    say(f"Report written to {report_path}")
    return data


_BOUNDS = ReplayBounds()


def replay_cmd(
    url: Annotated[str, typer.Option(help="server base URL")] = "http://127.0.0.1:8000",
    admin_key_file: Annotated[Path | None, typer.Option(help="file holding an operator key")] = None,
    admin_key: Annotated[str | None, typer.Option(envvar="PATINOX_ADMIN_KEY", help="an operator key")] = None,
    trace: Annotated[str, typer.Option(help="azure-llm-2023 | servegen-deepseek-r1")] = "azure-llm-2023",
    plan: Annotated[
        list[str] | None,
        typer.Option(help="SOURCE=PLAN, one tenant per source (azure-code, azure-conv, servegen-<client>)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for sampled arrivals (ServeGen)")] = 0,
    duration: Annotated[float, typer.Option(help="seconds of trace time to replay")] = 60.0,
    compression: Annotated[float, typer.Option(help="time compression factor (2 = twice as fast)")] = 1.0,
    model: Annotated[str, typer.Option(help="agent model (simulated by default)")] = "simulated",
    report: Annotated[Path, typer.Option(help="JSON report path")] = Path("replay-report.json"),
    traces_dir: Annotated[
        Path | None, typer.Option(help="traces folder (default: bundled data/traces)")
    ] = None,
    max_in_flight: Annotated[
        int, typer.Option(min=1, help="most requests in flight, all tenants together")
    ] = _BOUNDS.max_in_flight,
    max_in_flight_per_tenant: Annotated[
        int, typer.Option(min=1, help="most requests in flight per tenant (its connections)")
    ] = _BOUNDS.max_in_flight_per_tenant,
    late_tolerance: Annotated[
        float,
        typer.Option(min=0, help="seconds a request may leave after its due time; then dropped if no slot"),
    ] = _BOUNDS.late_tolerance_s,
    drain_timeout: Annotated[
        float,
        typer.Option(min=0, help="seconds to wait for answers after the last due time; then unfinished"),
    ] = _BOUNDS.drain_timeout_s,
) -> None:
    """Replay a real public trace against a running server, one tenant per trace source.

    Open loop and bounded: each request leaves at its trace time whatever became of the
    earlier ones, while fewer than --max-in-flight-per-tenant of its tenant and
    --max-in-flight in all are in flight; one that finds no free slot by --late-tolerance
    after its due time is dropped (never sent). The run ends --drain-timeout seconds after
    the last due time at the latest: requests still in flight then are cancelled and
    counted unfinished. Every request ends up completed, throttled (429), failed,
    unfinished or dropped; late counts those sent over --late-tolerance after their due time.
    """
    key = admin_key
    if not key and admin_key_file is not None:
        try:
            key = admin_key_file.read_text().strip()
        except (OSError, UnicodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            fail(f"cannot read --admin-key-file {admin_key_file}: {reason}")
    if not key:
        fail("give --admin-key-file or --admin-key (or PATINOX_ADMIN_KEY)")
    if not (compression > 0 and duration > 0 and math.isfinite(compression) and math.isfinite(duration)):
        fail("--compression and --duration must be finite and > 0")
    run_replay(
        url,
        key,
        trace=trace,
        plans=_plans(plan or ["azure-code=free", "azure-conv=pro"]),
        duration=duration,
        compression=compression,
        report_path=report,
        model=model,
        traces_dir=traces_dir,
        seed=seed,
        bounds=_replay_bounds(max_in_flight, max_in_flight_per_tenant, late_tolerance, drain_timeout),
    )


def _replay_bounds(total: int, per_tenant: int, late_tolerance: float, drain_timeout: float) -> ReplayBounds:
    try:
        return ReplayBounds(
            max_in_flight=total,
            max_in_flight_per_tenant=per_tenant,
            late_tolerance_s=late_tolerance,
            drain_timeout_s=drain_timeout,
        )
    except ConfigurationError as err:
        fail(str(err))
