"""What each isolation level adds to a run: bare agent, ``namespace``, ``process``,
``container``, ``dedicated``, side by side in one process, interleaved.

The workload is the same at every level: synchronous runs of one agent on the
**simulated** model (an offline stand-in for a model) with 20 ms of model time per response
(``simulated:ttft_ms=20,tpot_ms=0``), each run's prompt length and output tokens taken, in
order, from the Azure LLM inference trace (``azure-llm-2023``, conversation file; see
``data/traces``). Sides:

* **bare**: :func:`patinox.agents.run_agent` called directly: no tenancy, no admission, no
  storage;
* **each level** this host offers (:func:`patinox.isolation.host.detect_host` ``.levels()``)
  that the runtime has an executor for: a tenant at that level (plan ``enterprise``,
  limits raised so that nothing is refused yet every limit is checked) and
  ``RunService.start`` in process, as ``bench/run_path_cpu.py`` does (admission, the run
  row, the executor, settlement with usage and audit records). A level not offered is
  reported as such (``"available": false`` and why), never measured at another level.

The sides take turns in round-robin blocks of ``--block`` runs for ``--rounds`` rounds,
after a warm-up block each (the ``process`` level's template and pool are started then), so
a slow spell of this shared machine falls on every side. Then **cold start**: for each
level, ``--cold`` times, create a tenant at that level and complete its first run (key,
agent, one run), minus the same at ``namespace``; the tenants are deleted again.

Output: a table beside the design's estimates and the targets, and
``bench/results/isolation_overhead.json``: ``levels`` keyed by level name, each with
``ratio_to_bare`` (mean run time / bare), ``ratio_to_namespace``, ``overhead_us`` (the p50
run time minus namespace's p50, microseconds; over bare for namespace itself),
``p99_overhead_us`` (the same at p99) and ``cold_start_ms``. No timing is asserted. Run:
``.venv/bin/python bench/isolation_overhead.py [--rounds 12] [--block 20] [--cold 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "src"))

from patinox import AgentSpec, RunRequest, Runtime, Settings, TenantSpec  # noqa: E402
from patinox.agents import AgentDefinition, RunLimits, run_agent  # noqa: E402
from patinox.isolation.cgroups import CgroupManager, detect_cgroups  # noqa: E402
from patinox.isolation.host import detect_host  # noqa: E402
from patinox.isolation.workdir import Workdirs  # noqa: E402
from patinox.replay import load_trace  # noqa: E402
from patinox.storage.crypto import FileKeyProvider  # noqa: E402
from patinox.tenancy import IsolationLevel, LimitOverrides, TenantContext  # noqa: E402

RESULTS = BENCH_DIR / "results" / "isolation_overhead.json"
MODEL = "simulated:ttft_ms=20,tpot_ms=0"
LEVELS = (
    IsolationLevel.NAMESPACE,
    IsolationLevel.PROCESS,
    IsolationLevel.CONTAINER,
    IsolationLevel.DEDICATED,
)
#: The user's design's estimates of each level's overhead (fraction of run time).
DESIGN = {"namespace": "<= 5 %", "process": "10-20 %", "container": "15-30 %", "dedicated": "(container's)"}
#: Targets of issue 16 on this 2-core machine: (metric, limit).
TARGETS: dict[str, list[tuple[str, float]]] = {
    "namespace": [("ratio_to_bare", 1.05)],
    "process": [("ratio_to_namespace", 1.02), ("cold_start_ms", 200.0)],
    "container": [("ratio_to_namespace", 1.03), ("cold_start_ms", 300.0)],
    "dedicated": [("ratio_to_namespace", 1.02)],
}
HIGH = LimitOverrides(
    requests_per_minute=1_000_000,
    key_requests_per_minute=1_000_000,
    agent_runs_per_minute=1_000_000,
    max_concurrent_runs=1_000,
    runs_per_day=10**9,
    tokens_per_day=10**12,
    max_output_tokens_per_run=100_000,
)


@dataclass
class Side:
    """One column of the comparison: the bare agent or a tenant at one level."""

    name: str
    times_s: list[float] = field(default_factory=list)
    ctx: TenantContext | None = None
    agent_id: str = ""
    tenant_id: str = ""


class _NoMemory:
    """The bare side's memory store: the agent has no tools, so nothing calls it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the bare agent has no memory tools ({name})")


def workload(n: int) -> list[tuple[str, int]]:
    """``n`` (prompt, output tokens) pairs from the Azure conversation trace, in order
    (repeated when the trace is shorter); a prompt is as many words as the trace's prompt
    tokens (the simulated tokenizer counts words)."""
    reqs = load_trace("azure-llm-2023", sources=["azure-conv"])
    if not reqs:
        raise SystemExit("the azure-llm-2023 trace is empty")
    out = []
    for i in range(n):
        r = reqs[i % len(reqs)]
        out.append((" ".join(["token"] * r.prompt_tokens), r.output_tokens))
    return out


def offered(rt: Runtime) -> dict[str, str | None]:
    """Each level -> None when it is measured here, else why not."""
    host = detect_host().levels()
    why: dict[str, str | None] = {}
    for level in LEVELS:
        if level not in host:
            why[level.value] = "this host cannot enforce it (patinox doctor says what is missing)"
        elif level not in rt.executors.levels:
            why[level.value] = "this build's runtime has no executor for it"
        else:
            why[level.value] = None
    return why


async def tenant_at(rt: Runtime, name: str, level: IsolationLevel) -> tuple[str, TenantContext, str]:
    """A fresh tenant at ``level`` with a key and an agent; its (id, context, agent id)."""
    spec = TenantSpec(name=name, plan="enterprise", isolation_level=level, limits=HIGH)
    tenant = await asyncio.to_thread(rt.tenants.create, spec, actor="bench")
    key = rt.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="bench")
    ctx = rt.keys.authenticate(key.secret)
    assert isinstance(ctx, TenantContext)
    agent_id = str(rt.agents.create(ctx, AgentSpec(name="a", model=MODEL))["id"])
    return tenant.id, ctx, agent_id


def stats(times_s: list[float]) -> dict[str, float]:
    us = sorted(t * 1e6 for t in times_s)
    q = statistics.quantiles(us, n=100, method="inclusive")
    return {
        "mean_us": statistics.fmean(us),
        "p50_us": statistics.median(us),
        "p99_us": q[98],
        "runs": len(us),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    # The tenants' working directories (each a tmpfs as root) outside the deployment's
    # directory, which execution processes must not be able to enter.
    exec_root = Path(tempfile.mkdtemp(prefix="patinox-bench-exec-", dir="/tmp"))
    exec_root.chmod(0o711)
    prefix = f"patinox-bench-{os.getpid()}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            kek = Path(tmp) / "kek.json"
            FileKeyProvider.create(kek)
            settings = Settings(
                database_url=f"sqlite:///{tmp}/patinox.db",
                kek_url=f"file://{kek}",
                exec_root=exec_root,
                exec_cgroup_prefix=prefix,
            )
            rt = Runtime.build(settings)
            # As a server with its embedded queue worker: this process executes runs, so a
            # tenant created at an isolated level gets its execution resources at creation.
            rt.worker(concurrency=1)
            try:
                return await _measure(rt, args)
            finally:
                await rt.runs.shutdown()
                rt.close()
                rt.backend.close()
    finally:
        workdirs = Workdirs(exec_root)
        for tenant_dir in exec_root.iterdir():
            if tenant_dir.is_dir():
                workdirs.remove(tenant_dir.name)
        shutil.rmtree(exec_root, ignore_errors=True)
        support = detect_cgroups()
        if support.controllers:
            CgroupManager(support, prefix=prefix).remove_all()


async def _measure(rt: Runtime, args: argparse.Namespace) -> dict[str, Any]:
    why = offered(rt)
    levels = [lvl for lvl in LEVELS if why[lvl.value] is None]
    sides = [Side("bare")]
    for level in levels:
        tid, ctx, agent_id = await tenant_at(rt, f"warm-{level.value}", level)
        sides.append(Side(level.value, ctx=ctx, agent_id=agent_id, tenant_id=tid))
    work = workload(args.block * (args.rounds + 1))
    definition = AgentDefinition(name="a", instructions="", model=MODEL, tools=())
    limits = RunLimits(max_output_tokens=100_000, max_tool_calls=0, timeout_s=60)
    memory: Any = _NoMemory()

    async def one(side: Side, prompt: str, output_tokens: int) -> float:
        t0 = time.perf_counter()
        if side.ctx is None:
            await run_agent(definition, prompt, output_tokens=output_tokens, limits=limits, memory=memory)
        else:
            req = RunRequest(input=prompt, output_tokens=output_tokens)
            run = await rt.runs.start(side.ctx, side.agent_id, req)
            assert run["status"] == "succeeded", run
        return time.perf_counter() - t0

    for side in sides:  # warm-up: templates, pools, caches; not measured
        for prompt, out in work[: args.block]:
            await one(side, prompt, out)
    for r in range(args.rounds):
        block = work[(r + 1) * args.block : (r + 2) * args.block]
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            for prompt, out in block:
                side.times_s.append(await one(side, prompt, out))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    for side in sides[1:]:  # a dedicated tenant holds a core that a cold one may need
        await asyncio.to_thread(rt.tenants.delete, side.tenant_id, actor="bench")
    cold = await _cold_starts(rt, levels, work, args.cold)
    by = {side.name: stats(side.times_s) for side in sides}
    report = _levels(by, cold, why)
    bare = by["bare"]
    return {
        "bench": "isolation_overhead",
        "simulated": True,
        "model": MODEL,
        "trace": "azure-llm-2023/azure-conv (prompt and output tokens, in order)",
        "rounds": args.rounds,
        "block": args.block,
        "cold_repeats": args.cold,
        "host": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "note": "shared, noisy machine",
        },
        "bare": {k: round(v, 1) for k, v in bare.items()},
        "levels": report,
    }


async def _cold_starts(
    rt: Runtime, levels: list[IsolationLevel], work: list[tuple[str, int]], repeats: int
) -> dict[str, list[float]]:
    """Per level, ms from creating a tenant to its first run completed (``repeats`` times,
    the levels in turn); each tenant is deleted again (a ``dedicated`` one holds a core)."""
    cold: dict[str, list[float]] = {lvl.value: [] for lvl in levels}
    for i in range(repeats):
        for level in levels:
            t0 = time.perf_counter()
            tid, ctx, agent_id = await tenant_at(rt, f"cold-{level.value}-{i}", level)
            prompt, out = work[i]
            run = await rt.runs.start(ctx, agent_id, RunRequest(input=prompt, output_tokens=out))
            cold[level.value].append((time.perf_counter() - t0) * 1000)
            assert run["status"] == "succeeded", run
            await asyncio.to_thread(rt.tenants.delete, tid, actor="bench")
    return cold


def _levels(
    by: dict[str, dict[str, float]], cold: dict[str, list[float]], why: dict[str, str | None]
) -> dict[str, Any]:
    """The ``levels`` object of the report (see the module docstring)."""
    bare, ns = by["bare"], by.get("namespace")
    cold_ns = statistics.median(cold["namespace"]) if cold.get("namespace") else None
    report: dict[str, Any] = {}
    for level in LEVELS:
        name = level.value
        if name not in by:
            report[name] = {"available": False, "why": why[name]}
            continue
        s = by[name]
        base = bare if name == "namespace" or ns is None else ns
        cold_ms = statistics.median(cold[name])
        report[name] = {
            "available": True,
            "ratio_to_bare": round(s["mean_us"] / bare["mean_us"], 4),
            "ratio_to_namespace": None if ns is None else round(s["mean_us"] / ns["mean_us"], 4),
            "overhead_us": round(s["p50_us"] - base["p50_us"], 1),
            "p99_overhead_us": round(s["p99_us"] - base["p99_us"], 1),
            "cold_start_ms": 0.0 if name == "namespace" or cold_ns is None else round(cold_ms - cold_ns, 1),
            "cold_start_total_ms": round(cold_ms, 1),
            **{k: round(v, 1) for k, v in s.items()},
        }
    return report


def verdict(name: str, row: dict[str, Any]) -> str:
    parts = []
    for metric, limit in TARGETS.get(name, []):
        value = row.get(metric)
        if value is None:
            continue
        ok = value <= limit
        parts.append(f"{metric} {value:g} {'<=' if ok else '>'} {limit:g} {'ok' if ok else 'MISSED'}")
    return "; ".join(parts)


def table(result: dict[str, Any]) -> None:
    bare = result["bare"]
    print(
        f"\nbare agent: mean {bare['mean_us'] / 1000:.2f} ms, p50 {bare['p50_us'] / 1000:.2f} ms, "
        f"p99 {bare['p99_us'] / 1000:.2f} ms ({bare['runs']:.0f} runs; simulated model, 20 ms per response)"
    )
    head = (
        f"{'level':10} {'/bare':>7} {'/ns':>7} {'p50 +us':>9} {'p99 +us':>9} {'cold +ms':>9}  "
        f"{'design':>14}  targets"
    )
    print(head)
    print("-" * len(head))
    for name, row in result["levels"].items():
        if not row["available"]:
            print(f"{name:10} {'not offered: ' + row['why']}")
            continue
        ratio_ns = "-" if row["ratio_to_namespace"] is None else f"{row['ratio_to_namespace']:.3f}"
        print(
            f"{name:10} {row['ratio_to_bare']:7.3f} {ratio_ns:>7} {row['overhead_us']:9.0f} "
            f"{row['p99_overhead_us']:9.0f} {row['cold_start_ms']:9.1f}  {DESIGN[name]:>14}  "
            f"{verdict(name, row)}"
        )
    print("(p50/p99 +us: over namespace; namespace's over bare. One shared 2-core machine: expect noise.)")


def main() -> None:
    parser = argparse.ArgumentParser(description="run time added by each isolation level")
    parser.add_argument("--rounds", type=int, default=12, help="round-robin rounds")
    parser.add_argument("--block", type=int, default=20, help="runs per side per round")
    parser.add_argument("--cold", type=int, default=3, help="cold starts per level")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON report path")
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
