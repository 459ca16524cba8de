"""Throughput of synchronous runs: Patinox against a no-tenancy baseline, side by side in one run.

Two servers run as separate uvicorn processes on free loopback ports:

- ``patinox``: ``python -m patinox serve`` on a fresh embedded deployment (SQLite, limits in
  memory) made by ``patinox init --key-file``; one tenant (plan ``enterprise``, with
  ``requests_per_minute`` = 1,000,000 and ``max_concurrent_runs`` = 1,000 so nothing is
  throttled, yet every limit is still checked), one key, two agents created over the HTTP
  API. Every run passes authentication, the tenant context, the rate limit, the
  concurrency cap, the token reservation, and writes its run, usage and audit records.
- ``baseline``: ``bench/baseline_app.py``, the same agent loop and the same number of
  SQLite writes in the same two transactions, behind a plain FastAPI route with no
  tenancy (the ceiling of this stack on this machine). Patinox's writes per run are
  counted first, in process, and reported beside the baseline's (``writes_per_run``).

The same Patinox server is also measured through its OpenAI-compatible route
(``POST /v1/chat/completions``, ``model`` = the agent's name, the same prompt as one user
message, ``max_tokens`` = the same output tokens): ``patinox-openai`` answers the
completion whole, ``patinox-openai-stream`` streams it (``stream: true``); for the stream
the time to first token (``ttft_p50_ms``/``ttft_p99_ms``: request sent to the first
content delta received) is reported too, beside ``baseline-stream``, the baseline app's
own streamed route (the same run and writes, the same chunk format). Their rounds
alternate with the others'.

Agents (both **simulated**: an offline stand-in for an LLM, not a real model):
``instant`` (``simulated:instant``, answers at once) and ``model20ms``
(``simulated:ttft_ms=20,tpot_ms=0``, 20 ms of model time per run).

For each agent and each number of closed-loop clients (1, 8, 32), each server is measured
for ``--duration`` seconds in total, split into ``--rounds`` rounds (default 5) that
alternate between the two servers (patinox, baseline, baseline, patinox, ...), so a slow
spell of the shared machine falls on both alike; a cell's figures are over all its rounds
(runs and time summed, quantiles over every run), and each round's runs/s is reported too
(``round_runs_per_s``). The first round of a cell warms up for 1 s, later ones for 0.25 s
(not measured). Each client sends a synchronous run, waits for the answer, and sends the next
(httpx, keep-alive, one pooled connection per client). Reported per cell: completed runs
per second, p50 and p99 latency (milliseconds), errors (non-200 answers and transport
errors). ``ratios`` divides Patinox's runs/s by the baseline's for the same cell.

Output: ``bench/results/throughput.json`` and a table. No timing is asserted: the figures
are reported, with the issue's targets marked met or not. Run:
``.venv/bin/python bench/throughput.py [--duration 5] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "throughput.json"
sys.path.insert(0, str(BENCH_DIR))

from _common import check, free_port  # noqa: E402
from _common import server as run_server  # noqa: E402
from baseline_app import AGENTS, INSTRUCTIONS, WRITES_PER_RUN  # noqa: E402

CLIENTS = (1, 8, 32)
#: The Patinox server measured through its OpenAI-compatible route, plain and streamed.
OPENAI_SERVERS = ("patinox-openai", "patinox-openai-stream")
SERVERS = ("patinox", "baseline", *OPENAI_SERVERS, "baseline-stream")
PROMPT = "Summarise the quarterly report for the operations team in one short paragraph."
OUTPUT_TOKENS = 16
WARMUP_S = 1.0
console = Console(width=150)


@dataclass
class Cell:
    """One measured cell: a server, an agent, a number of clients."""

    server: str
    agent: str
    clients: int
    runs_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    runs: int
    duration_s: float
    #: Server process CPU time (user + system) per completed run, milliseconds: less
    #: sensitive than runs/s to other work on a shared machine.
    cpu_ms_per_run: float
    #: runs/s of each round, in the order run (the cell's figure sums them all).
    round_runs_per_s: list[float]
    #: Streamed cells: time to the first content delta, milliseconds (NaN otherwise).
    ttft_p50_ms: float = float("nan")
    ttft_p99_ms: float = float("nan")


@dataclass
class Target:
    """One server under test: how to reach it and how to start a run of an agent."""

    name: str
    base_url: str
    headers: dict[str, str]
    run_paths: dict[str, str]  # agent name -> path of its run route
    pid: int = 0  # the server process, for its CPU time
    #: ``native``: the run route's body; ``openai``: a chat completion; ``openai-stream``:
    #: a streamed one (its time to first token measured).
    protocol: str = "native"

    def body(self, agent: str) -> dict[str, Any]:
        if self.protocol == "native":
            return {"input": PROMPT, "output_tokens": OUTPUT_TOKENS}
        return {
            "model": agent,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": OUTPUT_TOKENS,
            **({"stream": True} if self.protocol == "openai-stream" else {}),
        }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- servers ---------------------------------------------------------------------------------


def _onboard(url: str, operator_key: str) -> Target:
    """Create the bench tenant, its key and its two agents over Patinox's HTTP API."""
    with httpx.Client(base_url=url, timeout=30.0) as http:
        op = {"Authorization": f"Bearer {operator_key}"}
        tenant = check(
            http.post(
                "/admin/tenants",
                headers=op,
                json={
                    "name": "bench",
                    "plan": "enterprise",
                    "limits": {"requests_per_minute": 1_000_000, "max_concurrent_runs": 1000},
                },
            ),
            "create tenant",
        )
        key = check(
            http.post(f"/admin/tenants/{tenant['id']}/keys", headers=op, json={"name": "bench"}),
            "create key",
        )["key"]
        h = {"Authorization": f"Bearer {key}"}
        paths = {}
        for name, model in AGENTS.items():
            agent = check(
                http.post(
                    "/v1/agents", headers=h, json={"name": name, "model": model, "instructions": INSTRUCTIONS}
                ),
                f"create agent {name}",
            )
            paths[name] = f"/v1/agents/{agent['id']}/runs"
    return Target("patinox", url, h, paths)


def patinox_writes_per_run(tmp: Path) -> int:
    """SQLite writes (INSERT, UPDATE, DELETE) of one synchronous run of a pool tenant,
    counted on the statements Patinox sends (in process, on a scratch deployment), so the
    report shows the baseline does as many."""
    from sqlalchemy import event

    from patinox.control import AgentSpec, RunRequest, TenantSpec
    from patinox.runtime import Runtime
    from patinox.tenancy import TenantContext

    rt = Runtime.initialise(tmp)
    tenant = rt.tenants.create(TenantSpec(name="count", plan="enterprise"), actor="bench")
    ctx = rt.keys.authenticate(
        rt.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="bench").secret
    )
    assert isinstance(ctx, TenantContext)
    agent = rt.agents.create(ctx, AgentSpec(name="a", model=AGENTS["instant"], instructions=INSTRUCTIONS))
    request = RunRequest(input=PROMPT, output_tokens=OUTPUT_TOKENS)
    writes: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            writes.append(statement)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(rt.runs.start(ctx, agent["id"], request))  # first run of the day
        event.listen(rt.backend.engine, "before_cursor_execute", count)
        loop.run_until_complete(rt.runs.start(ctx, agent["id"], request))
    finally:
        loop.close()
        rt.backend.close()
    return len(writes)


# --- load ------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One round of one server in one cell: what :func:`_round` measured."""

    latencies: list[float]  # seconds, one per completed run
    ttfts: list[float]  # seconds, one per completed streamed run
    errors: int
    elapsed_s: float
    cpu_s: float  # the server process's CPU time during the round


async def _round(target: Target, agent: str, clients: int, duration_s: float, warmup_s: float) -> Sample:
    """``clients`` clients sending runs back to back for ``duration_s`` seconds, after
    ``warmup_s`` seconds of the same load that are not measured."""
    path = target.run_paths[agent]
    body = target.body(agent)
    streamed = target.protocol == "openai-stream"
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=target.base_url, headers=target.headers, limits=limits, timeout=60.0
    ) as http:

        async def client(deadline: float) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    if streamed:
                        ok = await _streamed(http, path, body, t0, ttfts)
                    else:
                        r = await http.post(path, json=body)
                        ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        # Warm-up: open every connection and let caches and pools fill; not measured.
        await asyncio.gather(*(client(time.perf_counter() + warmup_s) for _ in range(clients)))
        latencies.clear()
        ttfts.clear()
        errors = 0
        cpu0 = _cpu_s(target.pid)
        start = time.perf_counter()
        await asyncio.gather(*(client(start + duration_s) for _ in range(clients)))
        elapsed = time.perf_counter() - start
        cpu = _cpu_s(target.pid) - cpu0
    return Sample(latencies, ttfts, errors, elapsed, cpu)


async def _streamed(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], t0: float, ttfts: list[float]
) -> bool:
    """Send one streamed completion and read it to ``data: [DONE]``; record the time from
    ``t0`` to the first content delta (the role chunk's empty content is not one)."""
    first = True
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return False
        done = False
        async for line in r.aiter_lines():
            if first and '"content":"' in line and '"content":""' not in line:
                ttfts.append(time.perf_counter() - t0)
                first = False
            done = done or line == "data: [DONE]"
    return done and not first


def _cell(target: Target, agent: str, clients: int, samples: list[Sample]) -> Cell:
    """The cell of one server from its rounds: runs and time summed, quantiles over every run."""
    lat = sorted(x for sample in samples for x in sample.latencies)
    ttft = sorted(x for sample in samples for x in sample.ttfts)
    elapsed = sum(sample.elapsed_s for sample in samples)
    cpu = sum(sample.cpu_s for sample in samples)
    return Cell(
        server=target.name,
        agent=agent,
        clients=clients,
        runs_per_s=round(len(lat) / elapsed, 1),
        p50_ms=round(_quantile(lat, 0.50) * 1000, 2),
        p99_ms=round(_quantile(lat, 0.99) * 1000, 2),
        errors=sum(sample.errors for sample in samples),
        runs=len(lat),
        duration_s=round(elapsed, 3),
        cpu_ms_per_run=round(cpu * 1000 / len(lat), 3) if lat else float("nan"),
        round_runs_per_s=[round(len(x.latencies) / x.elapsed_s, 1) for x in samples],
        ttft_p50_ms=round(_quantile(ttft, 0.50) * 1000, 2),
        ttft_p99_ms=round(_quantile(ttft, 0.99) * 1000, 2),
    )


def _quantile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ascending values; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --- report ----------------------------------------------------------------------------------


def _ratios(cells: list[Cell]) -> list[dict[str, Any]]:
    by = {(c.server, c.agent, c.clients): c for c in cells}
    out = []
    for agent in AGENTS:
        for n in CLIENTS:
            p, b = by[("patinox", agent, n)], by[("baseline", agent, n)]
            out.append(
                {
                    "agent": agent,
                    "clients": n,
                    "runs_per_s": round(p.runs_per_s / b.runs_per_s, 3) if b.runs_per_s else None,
                    "p50_ms": round(p.p50_ms / b.p50_ms, 3) if b.p50_ms else None,
                    "cpu_ms_per_run": round(p.cpu_ms_per_run / b.cpu_ms_per_run, 3)
                    if b.cpu_ms_per_run
                    else None,
                }
            )
    return out


def _openai_ratios(cells: list[Cell]) -> list[dict[str, Any]]:
    """Each OpenAI-route cell against the native route's same cell (runs/s, p50)."""
    by = {(c.server, c.agent, c.clients): c for c in cells}
    out = []
    for agent in AGENTS:
        for n in CLIENTS:
            native = by[("patinox", agent, n)]
            for server in OPENAI_SERVERS:
                o = by[(server, agent, n)]
                out.append(
                    {
                        "server": server,
                        "agent": agent,
                        "clients": n,
                        "runs_per_s_vs_native": round(o.runs_per_s / native.runs_per_s, 3)
                        if native.runs_per_s
                        else None,
                        "p50_ms_vs_native": round(o.p50_ms / native.p50_ms, 3) if native.p50_ms else None,
                        "ttft_p50_ms": o.ttft_p50_ms,
                    }
                )
    return out


def _targets(cells: list[Cell], ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for this 2-core machine, with the measured values (reported, not asserted)."""
    by = {(c.server, c.agent, c.clients): c for c in cells}
    worst = min((r["runs_per_s"] for r in ratios if r["runs_per_s"] is not None), default=0.0)
    p50 = by[("patinox", "instant", 1)].p50_ms
    rps = by[("patinox", "model20ms", 8)].runs_per_s
    openai = [r["runs_per_s_vs_native"] for r in _openai_ratios(cells) if r["server"] == "patinox-openai"]
    worst_openai = min((x for x in openai if x is not None), default=0.0)
    ttft_gap = max(
        by[("patinox-openai-stream", agent, 1)].ttft_p50_ms - by[("baseline-stream", agent, 1)].ttft_p50_ms
        for agent in AGENTS
    )
    return [
        {"target": "patinox/baseline runs/s >= 0.85 in every cell", "measured": worst, "met": worst >= 0.85},
        {
            "target": "OpenAI route / native route runs/s >= 0.95 in every cell",
            "measured": worst_openai,
            "met": worst_openai >= 0.95,
        },
        {
            "target": "streamed time to first token p50, 1 client, within 2 ms of the baseline's (ms above)",
            "measured": round(ttft_gap, 2),
            "met": ttft_gap <= 2,
        },
        {"target": "patinox p50, 1 client, instant <= 12 ms", "measured": p50, "met": p50 <= 12},
        {"target": "patinox runs/s, 8 clients, model20ms >= 150", "measured": rps, "met": rps >= 150},
    ]


def _table(cells: list[Cell], ratios: list[dict[str, Any]]) -> Table:
    by = {(c.server, c.agent, c.clients): c for c in cells}
    table = Table(title="Synchronous runs over HTTP, closed loop (simulated models)")
    for col in ("agent", "clients", "patinox runs/s", "baseline runs/s", "ratio runs/s"):
        table.add_column(col, justify="right")
    for col in ("patinox p50/p99 ms", "baseline p50/p99 ms", "CPU ms/run p/b", "errors p/b"):
        table.add_column(col, justify="right")
    for r in ratios:
        p, b = by[("patinox", r["agent"], r["clients"])], by[("baseline", r["agent"], r["clients"])]
        ratio = r["runs_per_s"]
        style = "green" if ratio is not None and ratio >= 0.85 else "red"
        table.add_row(
            r["agent"],
            str(r["clients"]),
            f"{p.runs_per_s:.1f}",
            f"{b.runs_per_s:.1f}",
            f"[{style}]{ratio:.3f}[/{style}]" if ratio is not None else "n/a",
            f"{p.p50_ms:.1f} / {p.p99_ms:.1f}",
            f"{b.p50_ms:.1f} / {b.p99_ms:.1f}",
            f"{p.cpu_ms_per_run:.2f} / {b.cpu_ms_per_run:.2f}",
            f"{p.errors}/{b.errors}",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description="Patinox vs baseline throughput, side by side")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell and server")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds the duration is split into")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON report path")
    args = parser.parse_args()

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="patinox-bench-") as tmp:
        tmpdir = Path(tmp)
        writes = {"patinox": patinox_writes_per_run(tmpdir / "count"), "baseline": WRITES_PER_RUN}
        same = writes["patinox"] == writes["baseline"]
        console.print(
            f"SQLite writes per run: patinox {writes['patinox']}, baseline {writes['baseline']}"
            + ("" if same else " [red]-- the baseline no longer matches: update bench/baseline_app.py[/red]")
        )
        data_dir, key_file = tmpdir / "deployment", tmpdir / "operator.key"
        env = {**os.environ, "PATINOX_DATA_DIR": str(data_dir)}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "patinox",
                "init",
                "--data-dir",
                str(data_dir),
                "--key-file",
                str(key_file),
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        p_port, b_port = free_port(), free_port()
        p_url, b_url = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{b_port}"
        patinox_argv = [
            sys.executable, "-m", "patinox", "serve", "--data-dir", str(data_dir), "--port", str(p_port)
        ]  # fmt: skip
        baseline_argv = [
            sys.executable, str(BENCH_DIR / "baseline_app.py"),
            "--port", str(b_port), "--db", str(tmpdir / "baseline.db"),
        ]  # fmt: skip
        with (
            run_server(patinox_argv, p_url, tmpdir / "patinox.log") as p_proc,
            run_server(baseline_argv, b_url, tmpdir / "baseline.log") as b_proc,
        ):
            native = dataclasses.replace(_onboard(p_url, key_file.read_text().strip()), pid=p_proc.pid)
            chat = {a: "/v1/chat/completions" for a in AGENTS}
            targets = {
                "patinox": native,
                "baseline": Target(
                    "baseline", b_url, {}, {a: f"/agents/{a}/runs" for a in AGENTS}, pid=b_proc.pid
                ),
                "patinox-openai": dataclasses.replace(
                    native, name="patinox-openai", run_paths=chat, protocol="openai"
                ),
                "patinox-openai-stream": dataclasses.replace(
                    native, name="patinox-openai-stream", run_paths=chat, protocol="openai-stream"
                ),
                "baseline-stream": Target(
                    "baseline-stream",
                    b_url,
                    {},
                    {a: f"/agents/{a}/stream" for a in AGENTS},
                    pid=b_proc.pid,
                    protocol="openai-stream",
                ),
            }
            cells: list[Cell] = []
            for agent in AGENTS:
                for n in CLIENTS:
                    samples: dict[str, list[Sample]] = {server: [] for server in SERVERS}
                    for r in range(args.rounds):
                        # Rounds alternate the order of the servers, so a slow spell of the
                        # shared machine falls on all alike.
                        for server in SERVERS if r % 2 == 0 else SERVERS[::-1]:
                            warmup = WARMUP_S if r == 0 else WARMUP_S / 4
                            samples[server].append(
                                asyncio.run(
                                    _round(targets[server], agent, n, args.duration / args.rounds, warmup)
                                )
                            )
                    for server in SERVERS:
                        cell = _cell(targets[server], agent, n, samples[server])
                        cells.append(cell)
                        ttft = "" if math.isnan(cell.ttft_p50_ms) else f" ttft p50 {cell.ttft_p50_ms:.1f} ms"
                        console.print(
                            f"{server:>21} {agent:>9} clients={n:<2} {cell.runs_per_s:7.1f} runs/s "
                            f"p50 {cell.p50_ms:6.1f} ms p99 {cell.p99_ms:6.1f} ms "
                            f"CPU {cell.cpu_ms_per_run:5.2f} ms/run errors {cell.errors} "
                            f"rounds {cell.round_runs_per_s}{ttft}"
                        )

    ratios = _ratios(cells)
    report = {
        "bench": "throughput",
        "what": "synchronous agent runs over HTTP; closed-loop clients; patinox vs no-tenancy baseline",
        "simulated": True,
        "models": AGENTS,
        "duration_s_per_cell": args.duration,
        "rounds_per_cell": args.rounds,
        "output_tokens": OUTPUT_TOKENS,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "writes_per_run": writes,
        "cells": [asdict(c) for c in cells],
        "ratios": ratios,
        "openai_ratios": _openai_ratios(cells),
        "targets": _targets(cells, ratios),
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(_table(cells, ratios))
    for r in report["openai_ratios"]:
        console.print(
            f"{r['server']:>21} {r['agent']:>9} clients={r['clients']:<2} runs/s vs native "
            f"{r['runs_per_s_vs_native']} p50 vs native {r['p50_ms_vs_native']} "
            f"ttft p50 {r['ttft_p50_ms']} ms"
        )
    for t in report["targets"]:
        mark = "[green]met[/green]" if t["met"] else "[red]not met[/red]"
        console.print(f"target: {t['target']}: measured {t['measured']} -> {mark}")
    console.print(f"report: {args.out} (wall time {report['wall_time_s']} s)")


if __name__ == "__main__":
    main()
