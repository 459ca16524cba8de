"""CPU time per synchronous run on the run path, this source tree against another, side by side.

``bench/throughput.py`` measures runs/s over HTTP against a no-tenancy baseline; on a
shared two-core machine its cell ratios move by +-0.1 from one run to the next, too much to
tell a 3 % change of the run path. This bench measures what a change to the run path
changes, CPU time, with less of the HTTP stack and the client around it: each side is a
fresh child process that builds a :class:`patinox.Runtime` on a new embedded deployment
(SQLite, limits in memory), one tenant (plan ``enterprise``, limits raised so that nothing
is refused yet every limit is checked), one agent on ``simulated:instant`` (**simulated**:
an offline stand-in for a model), and then starts ``--runs`` synchronous runs one after the
other through ``RunService.start`` (the call the HTTP route, the CLI and embedders make:
admission, the run row, the agent, settlement with usage and audit records), after
``--warmup`` runs not measured. It reports the process's CPU time per run (user + system,
``time.process_time``), in milliseconds.

The two sides alternate (``this, other, other, this, ...``) for ``--pairs`` pairs, so a
slow spell of the machine falls on both; the report gives each side's median and the ratio
this / other of the medians (below 1: this tree spends less CPU per run). ``--other`` is
the ``src`` directory of the other tree (e.g. a ``git worktree`` of an earlier commit).

Output: a table and ``bench/results/run_path_cpu.json``. No timing is asserted. Run:
``.venv/bin/python bench/run_path_cpu.py --other /path/to/other/src [--pairs 3] [--runs 1500]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
THIS_SRC = BENCH_DIR.parent / "src"
RESULTS = BENCH_DIR / "results" / "run_path_cpu.json"


def _child(runs: int, warmup: int) -> None:
    """Measure one side (in a child process whose ``PYTHONPATH`` names the tree)."""
    from patinox import AgentSpec, RunRequest, Runtime, Settings, TenantSpec
    from patinox.storage.crypto import FileKeyProvider
    from patinox.tenancy import LimitOverrides, TenantContext

    with tempfile.TemporaryDirectory() as tmp:
        kek = Path(tmp) / "kek.json"
        FileKeyProvider.create(kek)
        settings = Settings(database_url=f"sqlite:///{tmp}/patinox.db", kek_url=f"file://{kek}")
        rt = Runtime.build(settings)
        rt.backend.migrate()
        high = LimitOverrides(
            requests_per_minute=1_000_000,
            key_requests_per_minute=1_000_000,
            agent_runs_per_minute=1_000_000,
            max_concurrent_runs=1_000,
            runs_per_day=10**9,
            tokens_per_day=10**12,
        )
        tenant = rt.tenants.create(TenantSpec(name="bench", plan="enterprise", limits=high), actor="bench")
        key = rt.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="bench")
        ctx = rt.keys.authenticate(key.secret)
        assert isinstance(ctx, TenantContext)
        agent_id = str(rt.agents.create(ctx, AgentSpec(name="a", model="simulated:instant"))["id"])
        request = RunRequest(input="hello there", output_tokens=3)

        async def measure() -> float:
            for _ in range(warmup):
                await rt.runs.start(ctx, agent_id, request)
            cpu0 = time.process_time()
            for _ in range(runs):
                await rt.runs.start(ctx, agent_id, request)
            return time.process_time() - cpu0

        cpu = asyncio.run(measure())
        print(json.dumps({"cpu_ms_per_run": cpu * 1000 / runs}))


def _side(src: Path, runs: int, warmup: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    args = [sys.executable, __file__, "--child", "--runs", str(runs), "--warmup", str(warmup)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["cpu_ms_per_run"])


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU ms per run: this tree against another")
    parser.add_argument("--other", type=Path, help="the other tree's src directory")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs of measurements")
    parser.add_argument("--runs", type=int, default=1500, help="measured runs per measurement")
    parser.add_argument("--warmup", type=int, default=200, help="runs before measuring")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON report path")
    a = parser.parse_args()
    if a.child:
        _child(a.runs, a.warmup)
        return
    if a.other is None or not (a.other / "patinox").is_dir():
        parser.error("--other must name a source tree's src directory (it holds patinox/)")
    this: list[float] = []
    other: list[float] = []
    for i in range(a.pairs):
        order = [("this", THIS_SRC, this), ("other", a.other, other)]
        for name, src, into in order if i % 2 == 0 else order[::-1]:
            into.append(_side(src, a.runs, a.warmup))
            print(f"pair {i + 1} {name:5} {into[-1]:7.3f} CPU ms/run", flush=True)
    m_this, m_other = statistics.median(this), statistics.median(other)
    report = {
        "bench": "run_path_cpu",
        "simulated": True,
        "runs_per_measurement": a.runs,
        "this": this,
        "other": other,
        "other_src": str(a.other),
        "median_this_ms": round(m_this, 3),
        "median_other_ms": round(m_other, 3),
        "ratio_this_over_other": round(m_this / m_other, 3),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"median CPU ms/run: this {m_this:.3f}, other {m_other:.3f}; "
        f"ratio this/other {m_this / m_other:.3f} (below 1: this tree spends less)"
    )


if __name__ == "__main__":
    main()
