"""Noisy neighbour: does one tenant's overload reach the others? Four figures, one run.

Figures 1 and 2 are end to end against a real ``python -m patinox serve`` process, and are
measured twice in the same run, once on each deployment shape (the same workload and the
same targets, one shape after the other, each on a fresh deployment):

- ``embedded``: the default of a fresh ``patinox init`` data directory (SQLite file, rate
  limits ``memory://``, the KEK file ``patinox init`` made, the operator key it printed).
- ``postgres+redis``: the multi-process configuration of the README ("Running several
  processes") with one server. A scratch PostgreSQL database
  ``patinox_bench_nn_e2e_<pid>`` is made with :func:`patinox.storage.postgres.bootstrap`
  (roles ``patinox_bench_owner`` / ``patinox_bench_app``) and the server is started with
  ``PATINOX_DATABASE_URL`` = the application role's URL, ``PATINOX_OWNER_URL`` = the owner
  role's URL, ``PATINOX_RATE_LIMIT_URL`` = ``--redis-url`` (default
  ``redis://127.0.0.1:6379/0``) and ``PATINOX_KEK_URL`` = a KEK file made with
  :meth:`patinox.storage.crypto.FileKeyProvider.create`. The operator key is created
  before the server starts with ``ApiKeys(backend).create(tenant_id=None, ...)`` on that
  database (opening it with the owner URL migrates it). The server writes its rate windows
  under its fixed prefix, ``patinox:rate/<tenant_id>/...``; tenant ids are new in every
  run, so runs never share a window, and after the shape the keys of exactly the tenants
  it created are deleted (nothing else in Redis is touched; any left behind by a crash
  expire with their 60 s window). The database is dropped with
  :func:`patinox.storage.postgres.drop` after the server stopped. With ``--skip-pg``, or
  when PostgreSQL or Redis cannot be reached, this shape is reported as not run, with the
  reason.

In both shapes ``PATINOX_EMBEDDED_WORKERS`` is unset, so the server's in-process queue
worker has its default cap (256 runs at once) and the fair-share admission decides within
it. The embedded shape's figures keep the top-level keys
(``victim_p99_ratio``, ``jain_index``, ``victims``, ``jain``, ``server_errors``); both
shapes are in ``deployments`` (one entry each: configuration, figures, targets met), and
the PostgreSQL + Redis headline figures are also ``victim_p99_ratio_postgres`` and
``jain_index_postgres``.

1. ``victim_p99_ratio`` (end to end, per shape). Seven well-behaved tenants are seven real
   ServeGen DeepSeek-R1 clients (``servegen-26, 11, 30, 19, 66, 18, 15``, plan ``pro``)
   replayed from 18:00 of the trace day: arrivals sampled by
   :func:`patinox.replay.load_servegen` from each client's per-window rate and CV, prompt
   and output token counts from its dataset file, output tokens capped at the ``pro``
   plan's per-run maximum (8,192; the number lowered is reported). The aggressor is the
   Azure ``conv`` service (real inter-arrival times and token counts, from 60 s into the
   trace), a ``free`` tenant whose ``requests_per_minute`` is overridden to 60, replayed
   compressed so it sends 20x that (20 requests/s). Its outputs are capped at the ``free``
   plan's 2,048. All agents use the simulated model ``simulated:ttft_ms=50,tpot_ms=0.5``
   (50 ms + 0.5 ms/token: a shorter per-token time than the default 2 ms, only to keep the
   tail of each phase short).

   The same victim requests are replayed in four phases, ABBA: A = victims alone,
   B = victims + aggressor. The aggressor is sent from a child process (``_nn_load.py``)
   on the same wall-clock schedule, so its client work never shares the victims' event
   loop. Reported: pooled victim p50/p99 of each scenario, the ratio of p99s, the ratio of
   p99 *overhead* (latency minus the simulated model's own time, the part a neighbour can
   affect), and the aggressor's admitted / 429 counts.

2. ``jain_index`` (end to end, per shape, on a server of its own on the same deployment
   whose queue worker runs at most :data:`JAIN_SLOTS` runs at once, so the queue's order is
   what decides). Two ``free`` (weight 1)
   and two ``pro`` (weight 4) tenants each POST many asynchronous runs at once
   (``"mode": "async"``, agent ``simulated:ttft_ms=200,tpot_ms=0``); the server's
   in-process worker takes them from the
   durable fair queue (in the shape's database: SQLite or PostgreSQL). After every POST
   is answered, completed (and dispatched) runs per tenant are counted over a window
   while every tenant still has queued runs (checked), normalised by weight; Jain's index is
   ``(sum x)^2 / (n * sum x^2)``.

3. ``limiter_excess``: 4 processes x 4 threads hit one tenant's limit at once through
   ``WindowRateLimiter("redis://127.0.0.1:6379/0", key_prefix=<unique>)``, released by one
   barrier; excess = admitted - limit, worst of several trials.

4. ``starvation_rounds``: :class:`patinox.limits.FairRunQueue` directly on a real database
   (a SQLite file and a PostgreSQL database made with
   :func:`patinox.storage.postgres.bootstrap`, dropped after). A tenant queues 1,000 runs;
   at 20 points while they are dispatched (claim + release, one at a time) a one-run tenant
   queues one run; rounds = dispatches of the big tenant between that enqueue and the
   one-run tenant's dispatch. Worst over points and plan pairs. A second check puts the big
   tenant(s) at their concurrency cap and asks whether an idle worker can still claim the
   one-run tenant's run (``at_cap``).

5. ``overload_victim_p99_ratio``, ``overload_heavy_goodput`` and ``slot_wait_ratio`` (end
   to end, per shape, after part 2 on the same deployment, the tenants of part 2
   suspended so their backlog stays unclaimed): the server's own capacity shared fairly
   when it runs out; see ``bench/_nn_overload.py`` for the workload. The goodput's
   "off" half runs on a second server on the same deployment with
   ``PATINOX_FAIR_SHARE=off``, beside the first, its loaded phases alternating with the
   first server's.

Each shape's server log is scanned after its server stopped for unhandled exceptions
(counted by type in ``server_errors`` of the shape), so a 5xx seen by a tenant is
explained in the report.

Output: ``bench/results/noisy_neighbour.json`` and a table. Nothing is asserted; targets
are reported as met or not. Run: ``.venv/bin/python bench/noisy_neighbour.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "noisy_neighbour.json"
sys.path.insert(0, str(BENCH_DIR))

import _nn_overload as ov  # noqa: E402
from _common import check, free_port  # noqa: E402
from _common import server as run_server  # noqa: E402
from _nn_load import Outcome, Send, send_all  # noqa: E402

from patinox.limits import Claim, FairRunQueue  # noqa: E402
from patinox.limits.rate import KEY_PREFIX  # noqa: E402
from patinox.replay import default_traces_dir, load_servegen, load_trace, percentile  # noqa: E402
from patinox.tenancy import PLANS, new_id  # noqa: E402

console = Console(width=150)

# --- workload -----------------------------------------------------------------------------

VICTIM_CLIENTS = ("26", "11", "30", "19", "66", "18", "15")
SERVEGEN_START_S = 64_800.0  # 18:00 of the trace day: these clients are all active
VICTIM_PLAN = "pro"
AGGRESSOR_PLAN = "free"
AGGRESSOR_SOURCE = "azure-conv"
AZURE_START_S = 60.0  # skip the trace's ramp-up minute
TTFT_MS, TPOT_MS = 50.0, 0.5
MODEL = f"simulated:ttft_ms={TTFT_MS:g},tpot_ms={TPOT_MS:g}"
KEY_SCOPES = ["agents:write", "runs:write", "read"]

JAIN_MODEL = "simulated:ttft_ms=200,tpot_ms=0"
JAIN_TENANTS = {"jain-free-1": "free", "jain-free-2": "free", "jain-pro-1": "pro", "jain-pro-2": "pro"}
JAIN_RUNS = {"free": 120, "pro": 400}  # per tenant; <= 500 so GET /v1/runs?limit=500 lists them all
#: Queue-worker slots of the server the fairness part runs on: fewer than the tenants' own
#: limits of concurrent runs allow together, so the queue's order decides who runs.
JAIN_SLOTS = 8

DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
PG_OWNER_ROLE, PG_APP_ROLE = "patinox_bench_owner", "patinox_bench_app"

P99_RATIO_TARGET = 1.10  # victim_p99_ratio <= this
JAIN_TARGET = 0.99  # jain_index >= this


# --- servers (as bench/throughput.py) -----------------------------------------------------


@dataclass(frozen=True)
class Handle:
    name: str
    plan: str
    tenant_id: str
    key: str
    agent_id: str


def _onboard(
    http: httpx.Client, op_key: str, name: str, plan: str, limits: dict[str, int], model: str
) -> Handle:
    """A tenant (plan + limit overrides), a key and one agent, over the HTTP API."""
    op = {"Authorization": f"Bearer {op_key}"}
    body: dict[str, Any] = {"name": name, "plan": plan}
    if limits:
        body["limits"] = limits
    tenant = check(http.post("/admin/tenants", headers=op, json=body), f"create tenant {name}")
    key = check(
        http.post(
            f"/admin/tenants/{tenant['id']}/keys", headers=op, json={"name": "bench", "scopes": KEY_SCOPES}
        ),
        f"create key {name}",
    )["key"]
    agent = check(
        http.post(
            "/v1/agents",
            headers={"Authorization": f"Bearer {key}"},
            json={"name": f"nn-{name}", "model": model, "instructions": f"Noisy-neighbour agent of {name}."},
        ),
        f"create agent {name}",
    )
    return Handle(name, plan, tenant["id"], key, agent["id"])


# --- 1. victims vs aggressor ---------------------------------------------------------------


def _victim_sends(
    handles: dict[str, Handle], phase_s: float, compression: float, seed: int
) -> tuple[list[Send], int]:
    """The victims' requests of one phase (wall offsets) and how many outputs were capped."""
    folder = default_traces_dir() / "servegen-deepseek-r1"
    reqs = load_servegen(
        folder,
        clients=list(VICTIM_CLIENTS),
        start_s=SERVEGEN_START_S,
        duration_s=phase_s * compression,
        seed=seed,
    )
    cap = PLANS[VICTIM_PLAN].limits.max_output_tokens_per_run
    sends, clamped = [], 0
    for r in reqs:
        h = handles[r.source]
        clamped += r.output_tokens > cap
        sends.append(
            Send(
                tenant=r.source,
                key=h.key,
                agent_id=h.agent_id,
                offset_s=r.offset_s / compression,
                prompt_tokens=r.prompt_tokens,
                output_tokens=min(r.output_tokens, cap),
            )
        )
    return sends, clamped


def _aggressor_sends(h: Handle, phase_s: float, rpm: int, factor: float) -> tuple[list[Send], float, int]:
    """The aggressor's requests of one phase: Azure conv arrivals compressed to ``factor`` x
    its limit on average. Returns (sends, compression used, outputs capped)."""
    rate = rpm * factor / 60.0  # requests per wall second
    n = round(rate * phase_s)
    reqs = [
        r
        for r in load_trace("azure-llm-2023", sources=[AGGRESSOR_SOURCE], duration_s=AZURE_START_S + 900)
        if r.offset_s >= AZURE_START_S
    ]
    if len(reqs) <= n:
        raise SystemExit(f"the {AGGRESSOR_SOURCE} trace is too short for {n} aggressor requests")
    base = reqs[0].offset_s
    span = reqs[n].offset_s - base  # n inter-arrival gaps of real trace time -> phase_s of wall time
    compression = span / phase_s
    cap = PLANS[AGGRESSOR_PLAN].limits.max_output_tokens_per_run
    sends = [
        Send(
            tenant=h.name,
            key=h.key,
            agent_id=h.agent_id,
            offset_s=(r.offset_s - base) / compression,
            prompt_tokens=r.prompt_tokens,
            output_tokens=min(r.output_tokens, cap),
        )
        for r in reqs[:n]
    ]
    return sends, compression, sum(r.output_tokens > cap for r in reqs[:n])


def _run_phase(
    url: str, victims: list[Send], aggressor: list[Send] | None, tmp: Path, label: str
) -> tuple[list[Outcome], list[Outcome]]:
    """Send one phase; the aggressor (if any) from a child process on the same schedule."""
    start_at = time.time() + 2.0
    child = None
    out = tmp / f"aggressor-{label}.json"
    if aggressor is not None:
        spec = tmp / f"aggressor-{label}-spec.json"
        spec.write_text(
            json.dumps({"base_url": url, "start_at": start_at, "sends": [asdict(s) for s in aggressor]})
        )
        child = subprocess.Popen([sys.executable, str(BENCH_DIR / "_nn_load.py"), str(spec), str(out)])
    v = asyncio.run(send_all(url, victims, start_at=start_at))
    a: list[Outcome] = []
    if child is not None:
        if child.wait(timeout=300) != 0:
            raise SystemExit(f"aggressor process of phase {label} failed (exit {child.returncode})")
        a = [Outcome(**o) for o in json.loads(out.read_text())]
    return v, a


def _ok(o: Outcome) -> bool:
    return o.status in (200, 202) and o.code is None


def _stats(outcomes: list[Outcome]) -> dict[str, Any]:
    done = [o for o in outcomes if _ok(o)]
    lat = [o.latency_ms for o in done]
    over = [o.latency_ms - (TTFT_MS + TPOT_MS * o.output_tokens) for o in done]
    codes = Counter(o.code for o in outcomes if not _ok(o))
    return {
        "sent": len(outcomes),
        "completed": len(done),
        "throttled_429": sum(1 for o in outcomes if o.status == 429),
        "failed": sum(1 for o in outcomes if not _ok(o) and o.status != 429),
        "error_codes": dict(sorted((str(k), v) for k, v in codes.items())),
        "p50_ms": _r(percentile(lat, 50)),
        "p99_ms": _r(percentile(lat, 99)),
        "overhead_p50_ms": _r(percentile(over, 50)),
        "overhead_p99_ms": _r(percentile(over, 99)),
        "max_send_lag_ms": _r(max((o.lag_ms for o in outcomes), default=0.0)),
    }


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def victims_vs_aggressor(url: str, op_key: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=60.0) as http:
        victims = {
            f"servegen-{c}": _onboard(http, op_key, f"servegen-{c}", VICTIM_PLAN, {}, MODEL)
            for c in VICTIM_CLIENTS
        }
        aggressor = _onboard(
            http, op_key, "aggressor", AGGRESSOR_PLAN, {"requests_per_minute": args.aggressor_rpm}, MODEL
        )
        # Warm-up (not measured): every victim's key, DEK and agent are loaded once.
        for h in victims.values():
            for _ in range(2):
                check(
                    http.post(
                        f"/v1/agents/{h.agent_id}/runs",
                        headers={"Authorization": f"Bearer {h.key}"},
                        json={"input": "warm up", "output_tokens": 4},
                    ),
                    "warm-up run",
                )
    vsends, v_clamped = _victim_sends(victims, args.phase_s, args.compression, args.seed)
    asends, a_compression, a_clamped = _aggressor_sends(
        aggressor, args.phase_s, args.aggressor_rpm, args.aggressor_factor
    )
    console.print(
        f"victims: {len(VICTIM_CLIENTS)} ServeGen clients, {len(vsends)} runs per phase "
        f"({len(vsends) / args.phase_s:.1f}/s); aggressor: {len(asends)} runs per aggressor phase "
        f"({len(asends) / args.phase_s:.1f}/s vs a limit of {args.aggressor_rpm}/min)"
    )
    phases: list[dict[str, Any]] = []
    pooled: dict[str, list[Outcome]] = {"alone": [], "with_aggressor": []}
    aggr_all: list[Outcome] = []
    for i, scenario in enumerate(("alone", "with_aggressor", "with_aggressor", "alone")):
        label = f"{i + 1}-{scenario}"
        v, a = _run_phase(url, vsends, asends if scenario == "with_aggressor" else None, tmp, label)
        pooled[scenario] += v
        aggr_all += a
        st = _stats(v)
        phases.append({"phase": label, "victims": st, "aggressor": _stats(a) if a else None})
        extra = ""
        if a:
            ast = _stats(a)
            extra = (
                f" | aggressor sent {ast['sent']} admitted {ast['completed']} "
                f"429 {ast['throttled_429']} {ast['error_codes']}"
            )
        console.print(
            f"phase {label:<18} victims p50 {st['p50_ms']} p99 {st['p99_ms']} ms, overhead p99 "
            f"{st['overhead_p99_ms']} ms, completed {st['completed']}/{st['sent']}{extra}"
        )
        time.sleep(1.0)
    alone, loud = _stats(pooled["alone"]), _stats(pooled["with_aggressor"])
    per_tenant: dict[str, dict[str, Any]] = {}
    for name in victims:
        per_tenant[name] = {
            sc: _stats([o for o in pooled[sc] if o.tenant == name]) for sc in ("alone", "with_aggressor")
        }
    aggr = _stats(aggr_all)
    aggr_codes = Counter(o.code for o in aggr_all if o.status == 429)
    ratio = loud["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] and loud["p99_ms"] else None
    oratio = (
        loud["overhead_p99_ms"] / alone["overhead_p99_ms"]
        if alone["overhead_p99_ms"] and loud["overhead_p99_ms"]
        else None
    )
    return {
        "victim_p99_ratio": _r(ratio, 3),
        "victim_p99_alone_ms": alone["p99_ms"],
        "victim_p99_with_aggressor_ms": loud["p99_ms"],
        "victim_overhead_p99_ratio": _r(oratio, 3),
        "victims_alone": alone,
        "victims_with_aggressor": loud,
        "victims_per_tenant": per_tenant,
        "aggressor": {
            **aggr,
            "admitted": aggr["completed"],
            "rejected_429_by_code": dict(sorted((str(k), v) for k, v in aggr_codes.items())),
            "limit_requests_per_minute": args.aggressor_rpm,
            "sending_factor": args.aggressor_factor,
            "trace": f"azure-llm-2023/{AGGRESSOR_SOURCE} from {AZURE_START_S:g} s, "
            f"compressed {a_compression:.2f}x",
            "output_tokens_capped_at": PLANS[AGGRESSOR_PLAN].limits.max_output_tokens_per_run,
            "output_tokens_capped_requests": a_clamped,
        },
        "phases": phases,
        "setup": {
            "victims": [f"servegen-deepseek-r1/{c}" for c in VICTIM_CLIENTS],
            "victim_plan": VICTIM_PLAN,
            "servegen_start_s": SERVEGEN_START_S,
            "servegen_seed": args.seed,
            "trace_seconds_per_phase": args.phase_s * args.compression,
            "compression": args.compression,
            "wall_seconds_per_phase": args.phase_s,
            "victim_runs_per_phase": len(vsends),
            "victim_output_tokens_capped_at": PLANS[VICTIM_PLAN].limits.max_output_tokens_per_run,
            "victim_output_tokens_capped_requests_per_phase": v_clamped,
            "model": MODEL,
            "order": "ABBA: alone, with aggressor, with aggressor, alone (same victim requests each phase)",
            "latency": "client wall time of completed sync runs, nearest-rank percentiles; "
            "overhead = latency "
            "minus the simulated model time (ttft + tpot x output tokens)",
        },
    }


# --- 2. Jain's index over the durable queue, end to end -------------------------------------


def _parse_ts(text: str | None) -> datetime | None:
    if text is None:
        return None
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


async def _enqueue_all(
    url: str, handles: dict[str, Handle], counts: dict[str, int], concurrency: int = 16
) -> Counter[str]:
    """POST every async run, interleaved so each tenant finishes enqueuing about together."""
    order = sorted(
        ((i / counts[n], n) for n in handles for i in range(counts[n])), key=lambda x: (x[0], x[1])
    )
    queue: asyncio.Queue[str] = asyncio.Queue()
    for _, n in order:
        queue.put_nowait(n)
    statuses: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                h = handles[n]
                r = await client.post(
                    f"/v1/agents/{h.agent_id}/runs",
                    headers={"Authorization": f"Bearer {h.key}"},
                    json={"input": "queued work item", "output_tokens": 1, "mode": "async"},
                )
                statuses[f"{n}:{r.status_code}"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def jain(xs: list[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2); 1.0 is perfectly fair."""
    sq = sum(x * x for x in xs)
    return (sum(xs) ** 2) / (len(xs) * sq) if xs and sq else None


def jain_end_to_end(
    url: str, op_key: str, window_s: float, *, queue_database: str = "SQLite"
) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=60.0) as http:
        handles = {
            n: _onboard(http, op_key, n, plan, {"requests_per_minute": 1_000_000}, JAIN_MODEL)
            for n, plan in JAIN_TENANTS.items()
        }
    counts = {n: JAIN_RUNS[plan] for n, plan in JAIN_TENANTS.items()}
    t_enq = time.monotonic()
    statuses = asyncio.run(_enqueue_all(url, handles, counts))
    enqueue_s = time.monotonic() - t_enq
    time.sleep(0.5)
    t0 = datetime.now(UTC)
    time.sleep(window_s)
    t1 = datetime.now(UTC)
    per: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=url, timeout=60.0) as http:
        for n, h in handles.items():
            runs = check(
                http.get("/v1/runs", params={"limit": 500}, headers={"Authorization": f"Bearer {h.key}"}),
                "list runs",
            )
            assert isinstance(runs, list)
            started = [_parse_ts(r.get("started_at")) for r in runs]
            finished = [_parse_ts(r.get("finished_at")) for r in runs]
            w = PLANS[JAIN_TENANTS[n]].weight
            completed = sum(1 for f in finished if f is not None and t0 <= f < t1)
            dispatched = sum(1 for s in started if s is not None and t0 <= s < t1)
            per[n] = {
                "plan": JAIN_TENANTS[n],
                "weight": w,
                "enqueued": counts[n],
                "accepted_202": statuses.get(f"{n}:202", 0),
                "listed": len(runs),
                "completed_in_window": completed,
                "dispatched_in_window": dispatched,
                "still_queued_after_window": sum(1 for r in runs if r["status"] == "queued"),
                "failed": sum(1 for r in runs if r["status"] == "failed"),
                "completed_per_weight": round(completed / w, 2),
            }
    backlogged = all(p["still_queued_after_window"] > 0 for p in per.values())
    j = jain([p["completed_in_window"] / p["weight"] for p in per.values()])
    jd = jain([p["dispatched_in_window"] / p["weight"] for p in per.values()])
    return {
        "jain_index": _r(j, 4),
        "jain_index_dispatched": _r(jd, 4),
        "all_backlogged_through_window": backlogged,
        "window_s": window_s,
        "enqueue_s": round(enqueue_s, 1),
        "tenants": per,
        "path": "end to end: POST /v1/agents/{id}/runs mode=async -> durable FairRunQueue "
        f"({queue_database}) -> the server's in-process RunWorker (fair-share admission)",
        "model": JAIN_MODEL,
        "other_statuses": {k: v for k, v in statuses.items() if not k.endswith(":202")},
        "tenant_ids": [h.tenant_id for h in handles.values()],
    }


# --- 3. the Redis limiter under 4 processes -------------------------------------------------


def limiter_excess(
    redis_url: str, *, limits: list[int], procs: int, threads: int, attempts: int
) -> dict[str, Any]:
    try:
        import redis

        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
        client.ping()
    except Exception as err:  # no Redis: reported, not faked
        return {"limiter_excess": None, "skipped": f"Redis not reachable at {redis_url}: {err}"}
    from _nn_hammer import hammer

    ctx = multiprocessing.get_context("spawn")
    trials = len(limits)
    plan = [(f"patinox:bench-nn-{uuid.uuid4().hex}", f"tn_bench_{i}", lim) for i, lim in enumerate(limits)]
    barrier = ctx.Barrier(procs * threads)
    queue = ctx.Queue()
    ps = [
        ctx.Process(target=hammer, args=(redis_url, plan, threads, attempts, barrier, queue))
        for _ in range(procs)
    ]
    got: list[tuple[int, int, int, int]] = []
    try:
        for p in ps:
            p.start()
        deadline = time.monotonic() + 180
        while len(got) < procs * trials:
            try:
                got.append(queue.get(timeout=1))
            except Exception:  # queue.Empty: check that no child died
                dead = [p.exitcode for p in ps if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    for p in ps:
                        p.kill()
                    raise SystemExit(f"limiter hammer processes failed (exit codes {dead})") from None
        for p in ps:
            p.join(timeout=30)
    finally:
        for prefix, _, _ in plan:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        client.close()
    results = []
    for i in range(trials):
        mine = [g for g in got if g[0] == i]
        admitted = sum(g[1] for g in mine)
        results.append(
            {
                "limit": limits[i],
                "attempts": procs * threads * attempts,
                "admitted": admitted,
                "refused": sum(g[2] for g in mine),
                "store_errors": sum(g[3] for g in mine),
                "excess": max(0, admitted - limits[i]),
                "shortfall": max(0, limits[i] - admitted),
            }
        )
    return {
        "limiter_excess": max(r["excess"] for r in results),
        "processes": procs,
        "threads_per_process": threads,
        "storage": redis_url,
        "trials": results,
    }


# --- 4. starvation in FairRunQueue on real databases ------------------------------------------


def _tenant_row(backend: Any, name: str, plan: str) -> str:
    from patinox.storage import utcnow

    tid = new_id("tn")
    now = utcnow()
    backend.insert_tenant(
        {
            "id": tid,
            "name": f"{name}-{uuid.uuid4().hex[:8]}",
            "plan": plan,
            "state": "active",
            "isolation_level": "namespace",
            "storage_model": "pool",
            "limit_overrides": {},
            "created_at": now,
            "updated_at": now,
            "deleted_at": None,
        }
    )
    return tid


def _enqueue(q: FairRunQueue, tid: str, plan: str, *, cap: int = 1_000_000) -> str:
    p = PLANS[plan]
    run_id = new_id("run")
    q.enqueue(
        tid,
        run_id,
        weight=p.weight,
        priority=p.priority,
        max_running=cap,
        reserved_tokens=1,
        quota_period="bench",
    )
    return run_id


def _retire(backend: Any, q: FairRunQueue, tenants: list[str], held: list[Any] | None = None) -> None:
    """Take a scenario's tenants out of the way of the next one: release their held claims
    and suspend them (claims skip queued runs of tenants that are not active)."""
    for c in held or []:
        q.release(c.tenant_id, c.run_id)
    for tid in tenants:
        backend.update_tenant(tid, {"state": "suspended"})


def starvation(backend: Any, big_plan: str, small_plan: str, *, n_big: int, probes: int) -> dict[str, Any]:
    """Worst dispatches of a 1,000-run tenant between a one-run tenant's enqueue and its dispatch."""
    q = FairRunQueue(backend)
    big, small = _tenant_row(backend, "big", big_plan), _tenant_row(backend, "small", small_plan)
    t = time.perf_counter()
    for _ in range(n_big):
        _enqueue(q, big, big_plan)
    enqueue_s = time.perf_counter() - t
    # Probes while the big tenant still has >= ~75 % of its runs queued ("behind a thousand").
    step = max(1, int(n_big * 0.2 / probes))
    dispatched = 0
    rounds: list[int | None] = []
    t = time.perf_counter()
    claims = 0
    for p in range(probes):
        while dispatched < p * step:
            c = q.claim("bench-nn")
            claims += 1
            if c is None or c.tenant_id != big:
                raise SystemExit(f"unexpected claim while draining: {c}")
            q.release(c.tenant_id, c.run_id)
            dispatched += 1
        mine = _enqueue(q, small, small_plan)
        waited: int | None = 0
        while True:
            c = q.claim("bench-nn")
            claims += 1
            if c is None:
                waited = None  # nothing claimable although the run is queued: starved
                break
            q.release(c.tenant_id, c.run_id)
            if c.run_id == mine:
                break
            dispatched += 1
            assert waited is not None
            waited += 1
        rounds.append(waited)
    claim_s = time.perf_counter() - t
    left = q.depth(big)
    _retire(backend, q, [big, small])
    measured = [r for r in rounds if r is not None]
    return {
        "big": f"{big_plan} (weight {PLANS[big_plan].weight})",
        "small": f"{small_plan} (weight {PLANS[small_plan].weight})",
        "big_runs": n_big,
        "probes": probes,
        "rounds_per_probe": rounds,
        "worst_rounds": None if len(measured) < len(rounds) else max(measured),
        "starved_probes": len(rounds) - len(measured),
        "big_runs_still_queued_at_end": left,
        "enqueue_ms_per_run": round(enqueue_s * 1000 / n_big, 2),
        "claim_release_ms": round(claim_s * 1000 / max(1, claims), 2),
    }


def at_cap(backend: Any, big_plan: str, n_big_tenants: int, cap: int, queued: int) -> dict[str, Any]:
    """Big tenant(s) at their concurrency cap with runs still queued: can an idle worker
    claim a one-run ``free`` tenant's run? (The cap makes the big runs unclaimable.)"""
    q = FairRunQueue(backend)
    bigs = [_tenant_row(backend, f"capped{i}", big_plan) for i in range(n_big_tenants)]
    for _ in range(queued):
        for b in bigs:
            _enqueue(q, b, big_plan, cap=cap)
    held: list[Claim] = []
    while len(held) < cap * n_big_tenants:
        c = q.claim("bench-nn-cap")
        if c is None:
            break
        held.append(c)  # held, not released: the tenant fills its cap
    small = _tenant_row(backend, "small", "free")
    mine = _enqueue(q, small, "free")
    c = q.claim("bench-nn-cap")
    served = c is not None and c.run_id == mine
    at_cap_n = len(held)
    if c is not None:
        held.append(c)
    wide_served = None
    if not served:
        # Diagnosis: the same claim with a candidate scan wider than the default 16 rows.
        w = q.claim("bench-nn-cap", scan=10_000)
        wide_served = w is not None and w.run_id == mine
        if w is not None:
            held.append(w)
    _retire(backend, q, [*bigs, small], held)
    return {
        "big": f"{n_big_tenants} x {big_plan} "
        f"(weight {PLANS[big_plan].weight}, priority {PLANS[big_plan].priority})",
        "cap": cap,
        "held_at_cap": at_cap_n,
        "queued_per_big_tenant": queued - cap,
        "small_run_claimed": served,
        "claim_returned": None if c is None else ("small" if served else "other"),
        "claimed_with_scan_10000": wide_served,
    }


def queue_suite(
    label: str, backend: Any, args: argparse.Namespace, *, pairs: list[tuple[str, str]]
) -> dict[str, Any]:
    out: dict[str, Any] = {"database": label, "scenarios": [], "at_cap": []}
    for big, small in pairs:
        r = starvation(backend, big, small, n_big=args.big_runs, probes=args.probes)
        out["scenarios"].append(r)
        console.print(
            f"starvation {label}: big {r['big']} / small {r['small']}: worst {r['worst_rounds']} rounds "
            f"{r['rounds_per_probe']} (enqueue {r['enqueue_ms_per_run']} ms, "
            f"claim+release {r['claim_release_ms']} ms)"
        )
    for big_plan, n, cap in (("pro", 1, 4), ("pro", 5, 4), ("enterprise", 1, 4)):
        r = at_cap(backend, big_plan, n, cap, queued=40)
        out["at_cap"].append(r)
        console.print(f"at cap {label}: {r['big']}, cap {cap}: small run claimed: {r['small_run_claimed']}")
    worst = [s["worst_rounds"] for s in out["scenarios"]]
    out["starvation_rounds"] = None if any(w is None for w in worst) else max(worst)
    return out


def queue_benchmarks(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from patinox.storage import open_backend
    from patinox.storage.crypto import FileKeyProvider, key_provider_from_url

    kek = tmp / "queue-kek.json"
    FileKeyProvider.create(kek)
    kp = key_provider_from_url(f"file://{kek}")
    pairs = [("pro", "free"), ("free", "free"), ("free", "pro")]
    results: dict[str, Any] = {}
    backend = open_backend(f"sqlite:///{tmp / 'queue.db'}", key_provider=kp)
    try:
        results["sqlite"] = queue_suite("sqlite", backend, args, pairs=pairs)
    finally:
        backend.close()
    if args.skip_pg:
        results["postgresql"] = {"skipped": "--skip-pg"}
        return results
    from patinox.storage import postgres as pg

    database = f"patinox_bench_nn_{os.getpid()}"
    dep, why_not = scratch_postgres(args.pg_admin_url, database)
    if dep is None:
        results["postgresql"] = {"skipped": why_not}
        return results
    try:
        backend = open_backend(dep.app_url, owner_url=dep.owner_url, key_provider=kp)
        try:
            results["postgresql"] = queue_suite(
                "postgresql", backend, args, pairs=pairs if args.pg_all_pairs else pairs[:1]
            )
        finally:
            backend.close()
    finally:
        pg.drop(args.pg_admin_url, database=database)
    return results


# --- the two deployment shapes parts 1 and 2 run on -------------------------------------------

EMBEDDED, PG_REDIS = "embedded", "postgres+redis"
#: Variables that choose a deployment: unset for the embedded shape, set for PostgreSQL + Redis.
_DEPLOYMENT_VARS = (
    "PATINOX_DATABASE_URL",
    "PATINOX_OWNER_URL",
    "PATINOX_RATE_LIMIT_URL",
    "PATINOX_KEK_URL",
    "PATINOX_EMBEDDED_WORKERS",  # unset in both: the server's in-process worker, default cap
)


@dataclass(frozen=True)
class Shape:
    """A deployment one ``patinox serve`` process is started on."""

    name: str
    env: dict[str, str]
    data_dir: Path
    op_key: str
    queue_database: str  # under the durable run queue, as the report names it
    configuration: dict[str, Any]


def _base_env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "PATINOX_DATA_DIR": str(data_dir)}
    for var in _DEPLOYMENT_VARS:
        env.pop(var, None)
    return env


def embedded_shape(tmp: Path) -> Shape:
    """A fresh ``patinox init`` data directory: SQLite, rate limits in memory, its KEK file."""
    data_dir, key_file = tmp / "deployment", tmp / "operator.key"
    env = _base_env(data_dir)
    init = [sys.executable, "-m", "patinox", "init", "--data-dir", str(data_dir), "--key-file", str(key_file)]
    subprocess.run(init, check=True, env=env, stdout=subprocess.DEVNULL)
    return Shape(
        name=EMBEDDED,
        env=env,
        data_dir=data_dir,
        op_key=key_file.read_text().strip(),
        queue_database="SQLite",
        configuration={
            "database": "sqlite: <data dir>/patinox.db (patinox init)",
            "rate_limit_url": "memory:// (default)",
            "kek": "file: <data dir>/kek.json (patinox init)",
            "operator_key": "printed by patinox init --key-file",
            "queue_worker": "the server's in-process RunWorker (fair-share admission)",
        },
    )


def postgres_redis_shape(tmp: Path, dep: Any, redis_url: str) -> Shape:
    """The server's environment on a bootstrapped database, Redis and a new KEK file, and an
    operator key created directly in that database (opening it as owner migrates it)."""
    from patinox.control import ApiKeys
    from patinox.storage import open_backend
    from patinox.storage.crypto import FileKeyProvider, key_provider_from_url

    data_dir = tmp / "deployment-pg"
    data_dir.mkdir(mode=0o700)
    kek = tmp / "pg-kek.json"
    FileKeyProvider.create(kek)
    kek_url = f"file://{kek}"
    backend = open_backend(dep.app_url, owner_url=dep.owner_url, key_provider=key_provider_from_url(kek_url))
    try:
        op_key = (
            ApiKeys(backend).create(tenant_id=None, name="bench-operator", scopes=None, actor="bench").secret
        )
    finally:
        backend.close()
    env = {
        **_base_env(data_dir),
        "PATINOX_DATABASE_URL": dep.app_url,
        "PATINOX_OWNER_URL": dep.owner_url,
        "PATINOX_RATE_LIMIT_URL": redis_url,
        "PATINOX_KEK_URL": kek_url,
    }
    return Shape(
        name=PG_REDIS,
        env=env,
        data_dir=data_dir,
        op_key=op_key,
        queue_database="PostgreSQL",
        configuration={
            "database": f"postgresql: scratch database {dep.database} (bootstrap, dropped after)",
            "database_url": dep.app_url,
            "owner_url": dep.owner_url,
            "rate_limit_url": redis_url,
            "rate_limit_keys": f"{KEY_PREFIX}:rate/<tenant_id>/... (this run's tenants; deleted after)",
            "kek": "file: a new KEK file (FileKeyProvider.create), PATINOX_KEK_URL",
            "operator_key": "ApiKeys(backend).create(tenant_id=None) before the server started",
            "queue_worker": "the server's in-process RunWorker (fair-share admission)",
        },
    )


def _redis_unreachable(redis_url: str) -> str:
    """Why Redis at ``redis_url`` cannot be used, or ``""`` when it answers PING."""
    try:
        import redis

        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as err:  # no Redis: reported, not faked
        return f"Redis not reachable at {redis_url}: {err}"
    return ""


def _forget_rate_windows(redis_url: str, tenant_ids: list[str]) -> int:
    """Delete the server's rate windows of ``tenant_ids`` (and nothing else); keys deleted."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
    deleted = 0
    try:
        for tid in tenant_ids:
            keys = list(client.scan_iter(match=f"{KEY_PREFIX}:rate/{tid}/*", count=1000))
            if keys:
                deleted += int(client.delete(*keys))
    finally:
        client.close()
    return deleted


def _not_run(name: str, why: str) -> dict[str, Any]:
    return {"shape": name, "run": False, "skipped": why, "victim_p99_ratio": None, "jain_index": None}


def _targets_met(ratio: float | None, jain_index: float | None) -> dict[str, bool | None]:
    return {
        "victim_p99_ratio": None if ratio is None else ratio <= P99_RATIO_TARGET,
        "jain_index": None if jain_index is None else jain_index >= JAIN_TARGET,
    }


def _suspend(url: str, op_key: str, tenant_ids: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=60.0) as http:
        for tid in tenant_ids:
            check(
                http.post(f"/admin/tenants/{tid}/suspend", headers={"Authorization": f"Bearer {op_key}"}),
                "suspend a tenant",
            )


def _overload_figures(on: dict[str, Any], off: dict[str, Any], slot: dict[str, Any]) -> dict[str, Any]:
    """The three overload figures of a shape, their targets met, and what they came from."""
    alone, loaded = on["light_alone"]["p99_ms"], on["light_loaded"]["p99_ms"]
    ratio = loaded / alone if alone and loaded else None
    g_on, g_off = on["heavy"]["runs_per_s"], off["heavy"]["runs_per_s"]
    goodput = g_on / g_off if g_on is not None and g_off else None
    slot_ratio = slot["slot_wait_ratio"]
    return {
        "overload_victim_p99_ratio": _r(ratio, 3),
        "overload_heavy_goodput": _r(goodput, 3),
        "slot_wait_ratio": slot_ratio,
        "targets_met": {
            "overload_victim_p99_ratio": None if ratio is None else ratio <= ov.P99_RATIO_TARGET,
            "overload_heavy_goodput": None if goodput is None else goodput >= ov.GOODPUT_TARGET,
            "slot_wait_ratio": slot_ratio <= ov.SLOT_WAIT_TARGET,
        },
        "fair_share_on": on,
        "fair_share_off": off,
        "slot_wait": slot,
        "setup": {
            "light": f"1 pro tenant, {ov.LIGHT_RATE_PER_S:g} sync runs/s on {ov.MODEL}",
            "heavy": f"{ov.HEAVY_TENANTS} pro tenants x {ov.HEAVY_LOOPS} closed loops of sync runs on "
            f"{ov.MODEL}, limit overrides {ov.HEAVY_LIMITS}",
            "phases": "on alone, on loaded, off loaded, on loaded, off loaded, on alone (on: the "
            "server; off: a second server on the same deployment with PATINOX_FAIR_SHARE=off, "
            "running beside it)",
            "counted_from_s": ov.WARM_S,
        },
    }


def end_to_end(shape: Shape, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Parts 1 and 2 against one ``patinox serve`` started on ``shape``, stopped after.

    Returns:
        The shape's entry of ``deployments``: configuration, headline figures, targets met,
        the full ``victims`` and ``jain`` results, ``server_errors``, ``timings`` (seconds)
        and the ids of the tenants it created.
    """
    work = tmp / f"e2e-{shape.name.replace('+', '-')}"
    work.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    argv = [sys.executable, "-m", "patinox", "serve", "--data-dir", str(shape.data_dir), "--port", str(port)]
    console.rule(f"end to end: {shape.name}")
    timings: dict[str, float] = {}
    victims: dict[str, Any] = {}
    fairness: dict[str, Any] = {}
    if not args.only_overload:
        # The queue's own fairness, where the queue is what binds: a server on the same
        # deployment whose queue worker runs at most JAIN_SLOTS runs at once. (The main
        # server runs as many as its fair share of the process allows, so the backlog
        # would run out, or the tenants' own limits bind, before the queue's order shows.)
        jain_port = free_port()
        jain_url = f"http://127.0.0.1:{jain_port}"
        jain_env = {**shape.env, "PATINOX_EMBEDDED_WORKERS": str(JAIN_SLOTS)}
        with run_server([*argv[:-1], str(jain_port)], jain_url, work / "server-jain.log", jain_env):
            t = time.monotonic()
            fairness = jain_end_to_end(
                jain_url, shape.op_key, args.jain_window_s, queue_database=shape.queue_database
            )
            timings["jain_s"] = round(time.monotonic() - t, 1)
            console.print(
                f"jain: {fairness['jain_index']} (dispatched {fairness['jain_index_dispatched']}), "
                f"all backlogged {fairness['all_backlogged_through_window']}, "
                f"enqueue {fairness['enqueue_s']} s, completed in window "
                f"{ {n: p['completed_in_window'] for n, p in fairness['tenants'].items()} }"
            )
            # The jain tenants' backlog stays queued, unclaimed, while the rest runs.
            _suspend(jain_url, shape.op_key, fairness["tenant_ids"])
    with run_server(argv, url, log, shape.env):
        if not args.only_overload:
            t = time.monotonic()
            victims = victims_vs_aggressor(url, shape.op_key, work, args)
            timings["victims_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        handles = ov.onboard_overload(url, shape.op_key, _onboard)
        # The same deployment served at once by a second server with the fair-share
        # admission off (and no queue worker); the loaded phases alternate between them.
        off_port = free_port()
        off_url = f"http://127.0.0.1:{off_port}"
        off_argv = [*argv[:-1], str(off_port)]
        off_env = {**shape.env, "PATINOX_FAIR_SHARE": "off", "PATINOX_EMBEDDED_WORKERS": "0"}
        with run_server(off_argv, off_url, work / "server-fair-share-off.log", off_env):
            overload_on, overload_off = ov.overload_phases(
                {"on": url, "off": off_url}, handles, args.overload_phase_s, work, console.print
            )
        timings["overload_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        slot = ov.slot_wait(url, shape.op_key, _onboard, console.print)
        timings["slot_wait_s"] = round(time.monotonic() - t, 1)
        with httpx.Client(base_url=url, timeout=60.0) as http:
            listed = http.get("/admin/tenants", headers={"Authorization": f"Bearer {shape.op_key}"})
            tenants = check(listed, "list tenants")
            assert isinstance(tenants, list)
    overload = _overload_figures(overload_on, overload_off, slot)
    console.print(
        f"overload: victim p99 ratio {overload['overload_victim_p99_ratio']}, heavy goodput "
        f"{overload['overload_heavy_goodput']}, slot wait ratio {overload['slot_wait_ratio']}"
    )
    server_errors = _server_errors(log)
    if server_errors.get("asgi_exceptions"):
        console.print(f"[red]{shape.name} server logged unhandled exceptions:[/red] {server_errors}")
    return {
        "shape": shape.name,
        "run": True,
        "configuration": shape.configuration,
        "victim_p99_ratio": victims.get("victim_p99_ratio"),
        "victim_p99_alone_ms": victims.get("victim_p99_alone_ms"),
        "victim_p99_with_aggressor_ms": victims.get("victim_p99_with_aggressor_ms"),
        "victim_overhead_p99_ratio": victims.get("victim_overhead_p99_ratio"),
        "jain_index": fairness.get("jain_index"),
        "overload_victim_p99_ratio": overload["overload_victim_p99_ratio"],
        "overload_heavy_goodput": overload["overload_heavy_goodput"],
        "slot_wait_ratio": overload["slot_wait_ratio"],
        "targets_met": {
            **_targets_met(victims.get("victim_p99_ratio"), fairness.get("jain_index")),
            **overload["targets_met"],
        },
        "overload": overload,
        "server_errors": server_errors,
        "victims": victims,
        "jain": fairness,
        "timings": timings,
        "tenant_ids": [t["id"] for t in tenants],
    }


def postgres_redis_end_to_end(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Parts 1 and 2 on PostgreSQL + Redis, or the reason they were not run."""
    if args.skip_pg:
        return _not_run(PG_REDIS, "--skip-pg")
    why_not = _redis_unreachable(args.redis_url)
    if why_not:
        return _not_run(PG_REDIS, why_not)
    from patinox.storage import postgres as pg

    database = f"patinox_bench_nn_e2e_{os.getpid()}"
    dep, why_not = scratch_postgres(args.pg_admin_url, database)
    if dep is None:
        return _not_run(PG_REDIS, why_not)
    try:
        result = end_to_end(postgres_redis_shape(tmp, dep, args.redis_url), tmp, args)
    finally:
        pg.drop(args.pg_admin_url, database=database)  # after the server stopped
    result["configuration"]["rate_limit_keys_deleted"] = _forget_rate_windows(
        args.redis_url, result["tenant_ids"]
    )
    return result


def scratch_postgres(admin_url: str, database: str) -> tuple[Any, str]:
    """A scratch database (and the bench's two roles) made with
    :func:`patinox.storage.postgres.bootstrap`; the caller drops it with
    :func:`patinox.storage.postgres.drop`.

    Returns:
        ``(PostgresDeployment, "")``, or ``(None, why)`` when PostgreSQL is not usable at
        ``admin_url`` (reported as a skipped part, not faked).
    """
    from patinox.storage import postgres as pg

    try:
        return pg.bootstrap(admin_url, database=database, owner_role=PG_OWNER_ROLE, app_role=PG_APP_ROLE), ""
    except Exception as err:  # no PostgreSQL: reported, not faked
        with suppress(Exception):  # a database made before the failure
            pg.drop(admin_url, database=database)
        return None, f"PostgreSQL not usable at {admin_url}: {err}"


# --- report ----------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    return "n/a" if x is None else str(x)


def _mark(ok: bool | None) -> str:
    return "[yellow]n/a[/yellow]" if ok is None else ("[green]met[/green]" if ok else "[red]MISSED[/red]")


_E2E_FIGURES = (
    "victim_p99_ratio",
    "victim_overhead_p99_ratio",
    "aggressor 429s",
    "victim runs failed",
    "jain_index",
    "overload_victim_p99_ratio",
    "overload_heavy_goodput",
    "slot_wait_ratio",
)


def _overload_rows(o: dict[str, Any]) -> dict[str, tuple[str, str, str, str]]:
    """A shape's overload rows of the table: figure -> (value, target, mark, detail)."""
    on, off, slot, met = o["fair_share_on"], o["fair_share_off"], o["slot_wait"], o["targets_met"]
    return {
        "overload_victim_p99_ratio": (
            _fmt(o["overload_victim_p99_ratio"]),
            f"<= {ov.P99_RATIO_TARGET}",
            _mark(met["overload_victim_p99_ratio"]),
            f"light p99 alone {on['light_alone']['p99_ms']} ms, beside the heavy tenants "
            f"{on['light_loaded']['p99_ms']} ms (fair share off: {off['light_loaded']['p99_ms']} ms); "
            f"light refused {on['light_loaded']['refused'] or 'none'}",
        ),
        "overload_heavy_goodput": (
            _fmt(o["overload_heavy_goodput"]),
            f">= {ov.GOODPUT_TARGET}",
            _mark(met["overload_heavy_goodput"]),
            f"heavy runs/s on {on['heavy']['runs_per_s']} / off {off['heavy']['runs_per_s']}; "
            f"heavy refused on {on['heavy']['refused'] or 'none'}, off {off['heavy']['refused'] or 'none'}",
        ),
        "slot_wait_ratio": (
            _fmt(o["slot_wait_ratio"]),
            f"<= {ov.SLOT_WAIT_TARGET}",
            _mark(met["slot_wait_ratio"]),
            f"B idle {median(slot['b_idle_ms']):.1f} ms, with {slot['a_runs_running_when_b_arrived']} "
            f"of A's long runs running {median(slot['b_loaded_ms']):.1f} ms (medians)",
        ),
    }


def _end_to_end_rows(d: dict[str, Any]) -> dict[str, tuple[str, str, str, str]]:
    """One deployment shape's rows of the table: figure -> (value, target, mark, detail)."""
    p99_target, jain_target = f"<= {P99_RATIO_TARGET:.2f}", f">= {JAIN_TARGET}"
    if not d["run"]:
        why = escape(d["skipped"])
        return {
            "victim_p99_ratio": ("n/a", p99_target, "[yellow]not run[/yellow]", why),
            "jain_index": ("n/a", jain_target, "[yellow]not run[/yellow]", why),
        }
    if not d["victims"]:  # --only-overload
        return _overload_rows(d["overload"])
    v, j, se, met = d["victims"], d["jain"], d["server_errors"], d["targets_met"]
    a = v["aggressor"]
    failed = v["victims_alone"]["failed"] + v["victims_with_aggressor"]["failed"]
    kinds = ", ".join(f"{k} x{x['count']}" for k, x in se.get("by_type", {}).items())
    return {
        "victim_p99_ratio": (
            _fmt(v["victim_p99_ratio"]),
            p99_target,
            _mark(met["victim_p99_ratio"]),
            f"victim p99 alone {v['victim_p99_alone_ms']} ms, "
            f"with aggressor {v['victim_p99_with_aggressor_ms']} ms; "
            f"p50 {v['victims_alone']['p50_ms']} / {v['victims_with_aggressor']['p50_ms']} ms; "
            f"{v['victims_alone']['completed']}/{v['victims_with_aggressor']['completed']} runs",
        ),
        "victim_overhead_p99_ratio": (
            _fmt(v["victim_overhead_p99_ratio"]),
            "(info)",
            "",
            f"p99 of latency minus model time: alone {v['victims_alone']['overhead_p99_ms']} ms, "
            f"with aggressor {v['victims_with_aggressor']['overhead_p99_ms']} ms",
        ),
        "aggressor 429s": (
            f"{a['throttled_429']}/{a['sent']}",
            f"limit {a['limit_requests_per_minute']}/min",
            "",
            f"admitted {a['admitted']}; 429 by code {a['rejected_429_by_code']}; failed {a['failed']}",
        ),
        "victim runs failed": (
            f"{failed}/{v['victims_alone']['sent'] + v['victims_with_aggressor']['sent']}",
            "0",
            _mark(failed == 0),
            f"alone {v['victims_alone']['error_codes']}, "
            f"with aggressor {v['victims_with_aggressor']['error_codes']}; "
            f"server log: {se.get('asgi_exceptions')} unhandled ({kinds or 'none'})",
        ),
        "jain_index": (
            _fmt(j["jain_index"]),
            jain_target,
            _mark(met["jain_index"]),
            f"end to end; completed/weight per tenant "
            f"{ {n: p['completed_per_weight'] for n, p in j['tenants'].items()} }; dispatched-based "
            f"{j['jain_index_dispatched']}; all backlogged: {j['all_backlogged_through_window']}",
        ),
        **_overload_rows(d["overload"]),
    }


def _table(rep: dict[str, Any]) -> Table:
    t = Table(title="Noisy neighbour (simulated models; one run; figures, not assertions)")
    for col in ("figure", "value", "target", "", "detail"):
        t.add_column(col, overflow="fold")
    # The end-to-end figures side by side: each figure once per deployment shape.
    shapes = [(d["shape"], _end_to_end_rows(d)) for d in rep["deployments"]]
    for figure in _E2E_FIGURES:
        for name, rows in shapes:
            if figure in rows:
                t.add_row(f"{figure} ({name})", *rows[figure])
    lim = rep["limiter"]
    t.add_row(
        "limiter_excess",
        _fmt(lim.get("limiter_excess")),
        "0",
        _mark(None if lim.get("limiter_excess") is None else lim["limiter_excess"] == 0),
        lim.get("skipped")
        or f"{lim['processes']} procs x {lim['threads_per_process']} threads on Redis; admitted per trial "
        f"{[(r['admitted'], r['limit']) for r in lim['trials']]} (admitted, limit), "
        f"{lim['trials'][0]['attempts']} hits each",
    )
    for db, q in rep["queue"].items():
        if "skipped" in q:
            t.add_row(f"starvation_rounds ({db})", "n/a", "a few (<= 5)", _mark(None), q["skipped"])
            continue
        sr = q["starvation_rounds"]
        t.add_row(
            f"starvation_rounds ({db})",
            _fmt(sr),
            "a few (<= 5)",
            _mark(None if sr is None else sr <= 5),
            "; ".join(f"{s['big']} vs {s['small']}: {s['worst_rounds']}" for s in q["scenarios"]),
        )
        t.add_row(
            f"at cap ({db})",
            f"{sum(c['small_run_claimed'] for c in q['at_cap'])}/{len(q['at_cap'])} served",
            "all served",
            _mark(all(c["small_run_claimed"] for c in q["at_cap"])),
            "; ".join(
                f"{c['big']} held at cap {c['cap']}: {'served' if c['small_run_claimed'] else 'NOT served'}"
                for c in q["at_cap"]
            ),
        )
    return t


_EXC_LINE = re.compile(r"^((?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Set|Missing|Failed)): (.*)$")


def _server_errors(log: Path) -> dict[str, Any]:
    """Unhandled exceptions the server logged (uvicorn's "Exception in ASGI application"),
    counted by exception type, with one example message each."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return {"log": "unreadable"}
    kinds: Counter[str] = Counter()
    example: dict[str, str] = {}
    for line in lines:
        m = _EXC_LINE.match(line)
        if m:
            kinds[m[1]] += 1
            example.setdefault(m[1], m[2][:200])
    return {
        "asgi_exceptions": sum(1 for line in lines if "Exception in ASGI application" in line),
        "by_type": {k: {"count": n, "example": example[k]} for k, n in kinds.most_common()},
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description="Noisy-neighbour benchmark (see the module docstring)")
    parser.add_argument("--phase-s", type=float, default=15.0, help="wall seconds of each victim phase")
    parser.add_argument(
        "--compression", type=float, default=3.0, help="ServeGen trace seconds per wall second"
    )
    parser.add_argument("--seed", type=int, default=0, help="ServeGen sampling seed")
    parser.add_argument("--aggressor-rpm", type=int, default=60, help="the aggressor's requests_per_minute")
    parser.add_argument("--aggressor-factor", type=float, default=20.0, help="aggressor rate / its limit")
    parser.add_argument("--jain-window-s", type=float, default=10.0)
    parser.add_argument("--big-runs", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--redis-url", default=os.environ.get("PATINOX_BENCH_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument(
        "--pg-admin-url", default=os.environ.get("PATINOX_BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN)
    )
    parser.add_argument(
        "--skip-pg",
        action="store_true",
        help="no PostgreSQL at all: starvation on SQLite only, the postgres+redis shape not run",
    )
    parser.add_argument(
        "--pg-all-pairs", action="store_true", help="PostgreSQL: every plan pair (default: pro-vs-free only)"
    )
    parser.add_argument(
        "--overload-phase-s", type=float, default=30.0, help="wall seconds of each overload phase"
    )
    parser.add_argument(
        "--only-overload", action="store_true", help="only the overload figures (for tuning; no report)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    started = time.monotonic()
    load_before = _loadavg()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="patinox-nn-") as tmp_name:
        tmp = Path(tmp_name)
        # Parts 1 and 2 on each deployment shape in turn (each server stopped after its shape).
        embedded = end_to_end(embedded_shape(tmp), tmp, args)
        postgres = postgres_redis_end_to_end(tmp, args)
        if args.only_overload:
            for d in (embedded, postgres):
                console.print(
                    f"{d['shape']}: {json.dumps(d.get('overload', d.get('skipped')), default=str)[:3000]}"
                )
            return
        if not postgres["run"]:
            console.print(f"end to end on {PG_REDIS}: not run ({escape(postgres['skipped'])})")
        deployments = [embedded, postgres]
        timings["victims_s"] = embedded["timings"]["victims_s"]
        timings["jain_s"] = embedded["timings"]["jain_s"]
        if postgres["run"]:
            timings["victims_postgres_s"] = postgres["timings"]["victims_s"]
            timings["jain_postgres_s"] = postgres["timings"]["jain_s"]
        victims, fairness, server_errors = embedded["victims"], embedded["jain"], embedded["server_errors"]

        t = time.monotonic()
        limiter = limiter_excess(args.redis_url, limits=[100, 1, 7, 60, 250], procs=4, threads=4, attempts=50)
        timings["limiter_s"] = round(time.monotonic() - t, 1)
        console.print(f"limiter: excess {limiter.get('limiter_excess')} {limiter.get('skipped', '')}")
        t = time.monotonic()
        queue = queue_benchmarks(tmp, args)
        timings["queue_s"] = round(time.monotonic() - t, 1)

    sr = [q.get("starvation_rounds") for q in queue.values() if "skipped" not in q]
    report = {
        "bench": "noisy_neighbour",
        "simulated": True,
        "victim_p99_ratio": victims["victim_p99_ratio"],
        "victim_p99_alone_ms": victims["victim_p99_alone_ms"],
        "victim_p99_with_aggressor_ms": victims["victim_p99_with_aggressor_ms"],
        "aggressor_429": victims["aggressor"]["throttled_429"],
        "aggressor_sent": victims["aggressor"]["sent"],
        "jain_index": fairness["jain_index"],
        "victim_p99_ratio_postgres": postgres["victim_p99_ratio"],
        "jain_index_postgres": postgres["jain_index"],
        "overload_victim_p99_ratio": embedded["overload_victim_p99_ratio"],
        "overload_heavy_goodput": embedded["overload_heavy_goodput"],
        "slot_wait_ratio": embedded["slot_wait_ratio"],
        "overload_victim_p99_ratio_postgres": postgres.get("overload_victim_p99_ratio"),
        "overload_heavy_goodput_postgres": postgres.get("overload_heavy_goodput"),
        "slot_wait_ratio_postgres": postgres.get("slot_wait_ratio"),
        "limiter_excess": limiter.get("limiter_excess"),
        "starvation_rounds": None if not sr or any(x is None for x in sr) else max(sr),
        "targets": {
            "victim_p99_ratio": "<= 1.10",
            "jain_index": ">= 0.99",
            "limiter_excess": "0",
            "starvation_rounds": "a few scheduling rounds (this bench marks <= 5)",
            "overload_victim_p99_ratio": f"<= {ov.P99_RATIO_TARGET}",
            "overload_heavy_goodput": f">= {ov.GOODPUT_TARGET}",
            "slot_wait_ratio": f"<= {ov.SLOT_WAIT_TARGET}",
        },
        "deployment": "patinox serve, embedded default: SQLite, rate limits memory://, in-process worker "
        "(victims, jain; the same again on PostgreSQL + Redis: see deployments); limiter on Redis; "
        "FairRunQueue directly on SQLite and PostgreSQL (starvation)",
        "deployments": deployments,
        "server_errors": server_errors,
        "victims": victims,
        "jain": fairness,
        "limiter": limiter,
        "queue": queue,
        "timings": timings,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
        },
        "wall_time_s": round(time.monotonic() - started, 1),
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd()), *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(_table(report))
    console.print(f"report: {args.out} (wall time {report['wall_time_s']} s)")


if __name__ == "__main__":
    main()
