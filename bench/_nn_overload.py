"""The overload figures of ``bench/noisy_neighbour.py``: when the deployment itself runs out
of capacity, does it share it fairly?

- ``overload_victim_p99_ratio``: a light tenant (``pro``, 2 synchronous runs/s on
  :data:`MODEL`, 200 ms) alone, then beside :data:`HEAVY_TENANTS` heavy ``pro`` tenants
  that each run :data:`HEAVY_LOOPS` closed loops of synchronous runs on the same model
  (a child process, ``_nn_closed.py``), with request-rate overrides so high that none of
  their own limits binds: only the server's capacity does. Phases ABBA on the server with
  fair share on (alone, loaded, loaded, alone); the light tenant's pooled p99 loaded over
  its p99 alone.
- ``overload_heavy_goodput``: the heavy tenants' completed runs/s in the loaded phases with
  the fair-share admission on, over the same with it off (``PATINOX_FAIR_SHARE=off``: a
  second server on the same deployment, running beside the first, with no queue worker of
  its own), counted from :data:`WARM_S` after each phase's start to its end. The loaded
  phases alternate between the two servers (:data:`PHASES`), so a slow spell of the
  shared machine falls on both.
- ``slot_wait_ratio``: tenant B's instant asynchronous run, submitted-to-finished (the
  run's ``created_at`` to ``finished_at``), while tenant A's long asynchronous runs
  (``simulated:ttft_ms=45000``) already hold every slot they can get, over the same on
  the idle server (median of :data:`SLOT_PROBES` runs each).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

import httpx
from _common import check
from _nn_load import Outcome, Send, send_all

from patinox.replay import percentile

BENCH_DIR = Path(__file__).resolve().parent
MODEL = "simulated:ttft_ms=200,tpot_ms=0"
HEAVY_TENANTS, HEAVY_LOOPS = 6, 32
LIGHT_RATE_PER_S = 2.0
#: Seconds of each loaded phase before anything is counted (the loops start, the
#: adaptive limit settles).
WARM_S = 3.0
#: High enough that none of the heavy tenants' own request limits binds.
HEAVY_LIMITS = {"requests_per_minute": 1_000_000}
SLOT_MODEL_LONG = "simulated:ttft_ms=45000,tpot_ms=0"
SLOT_MODEL_B = "simulated:instant"
SLOT_A_RUNS = 64
SLOT_PROBES = 7
P99_RATIO_TARGET, GOODPUT_TARGET, SLOT_WAIT_TARGET = 1.5, 0.9, 2.0

Onboard = Callable[..., Any]  # noisy_neighbour._onboard(http, op_key, name, plan, limits, model)


def onboard_overload(url: str, op_key: str, onboard: Onboard) -> dict[str, Any]:
    """The light tenant and the heavy ones (plan ``pro``), each with a key and an agent on
    :data:`MODEL`; warmed up with one run each."""
    with httpx.Client(base_url=url, timeout=60.0) as http:
        light = onboard(http, op_key, "overload-light", "pro", {}, MODEL)
        heavy = [
            onboard(http, op_key, f"overload-heavy-{i}", "pro", HEAVY_LIMITS, MODEL)
            for i in range(HEAVY_TENANTS)
        ]
        for h in [light, *heavy]:
            check(
                http.post(
                    f"/v1/agents/{h.agent_id}/runs",
                    headers={"Authorization": f"Bearer {h.key}"},
                    json={"input": "warm up", "output_tokens": 4},
                ),
                "overload warm-up run",
            )
    return {"light": light, "heavy": heavy, "op_key": op_key}


def _light_sends(light: Any, phase_s: float) -> list[Send]:
    n = int((phase_s - WARM_S) * LIGHT_RATE_PER_S)
    return [
        Send(
            tenant=light.name,
            key=light.key,
            agent_id=light.agent_id,
            offset_s=WARM_S + i / LIGHT_RATE_PER_S,
            prompt_tokens=8,
            output_tokens=16,
        )
        for i in range(n)
    ]


def _phase(
    url: str, handles: dict[str, Any], phase_s: float, loaded: bool, tmp: Path, label: str
) -> dict[str, Any]:
    """One phase: the light tenant's runs, and the heavy loops beside them when ``loaded``."""
    start_at = time.time() + 2.0
    child = None
    out = tmp / f"overload-{label}.json"
    if loaded:
        spec = tmp / f"overload-{label}-spec.json"
        tenants = [
            {
                "name": h.name,
                "key": h.key,
                "agent_id": h.agent_id,
                "loops": HEAVY_LOOPS,
                "input": "heavy tenant work item",
                "output_tokens": 16,
            }
            for h in handles["heavy"]
        ]
        spec.write_text(
            json.dumps(
                {"base_url": url, "start_at": start_at, "stop_at": start_at + phase_s, "tenants": tenants}
            )
        )
        child = subprocess.Popen([sys.executable, str(BENCH_DIR / "_nn_closed.py"), str(spec), str(out)])
    sampler = _CapacitySampler(url, handles["op_key"], start_at + WARM_S, start_at + phase_s)
    sampler.start()
    light = asyncio.run(send_all(url, _light_sends(handles["light"], phase_s), start_at=start_at))
    sampler.join()
    heavy: list[list[Any]] = []
    if child is not None:
        if child.wait(timeout=300) != 0:
            raise SystemExit(f"heavy load process of phase {label} failed (exit {child.returncode})")
        heavy = json.loads(out.read_text())
    return {
        "label": label,
        "loaded": loaded,
        "light": light,
        "heavy": heavy,
        "phase_s": phase_s,
        "capacity": sampler.summary(),
    }


class _CapacitySampler(threading.Thread):
    """Samples the server's ``GET /admin/capacity`` every second between two wall times:
    the adaptive limit, runs executing and waiting, the loop's lag and busy fraction."""

    FIELDS = ("limit", "running", "waiting", "lag_ms", "busy")

    def __init__(self, url: str, op_key: str, start_at: float, stop_at: float) -> None:
        super().__init__(daemon=True)
        self.url, self.op_key, self.start_at, self.stop_at = url, op_key, start_at, stop_at
        self.samples: list[dict[str, Any]] = []
        self.event_loop: str | None = None

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.time()))
        with httpx.Client(base_url=self.url, timeout=10.0) as http:
            while time.time() < self.stop_at - 0.5:
                got = http.get("/admin/capacity", headers={"Authorization": f"Bearer {self.op_key}"})
                if got.status_code == 200:
                    body = got.json()
                    self.event_loop = body["event_loop"]
                    if body["fair_share"].get("enabled"):
                        self.samples.append(body["fair_share"])
                time.sleep(1.0)

    def summary(self) -> dict[str, Any]:
        """Median of each field over the samples (none when the fair share is off)."""
        out: dict[str, Any] = {"event_loop": self.event_loop, "samples": len(self.samples)}
        for f in self.FIELDS:
            values = [x[f] for x in self.samples if x.get(f) is not None]
            out[f] = _r(median(values), 2) if values else None
        return out


def _light_stats(outcomes: list[Outcome]) -> dict[str, Any]:
    ok = [o.latency_ms for o in outcomes if o.status == 200 and o.code is None]
    return {
        "sent": len(outcomes),
        "completed": len(ok),
        "refused": dict(Counter(o.code for o in outcomes if o.code is not None)),
        "p50_ms": _r(percentile(ok, 50)),
        "p99_ms": _r(percentile(ok, 99)),
        "max_ms": _r(max(ok, default=None)),
    }


def _heavy_stats(phases: list[dict[str, Any]]) -> dict[str, Any]:
    done = 0
    seconds = 0.0
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    for p in phases:
        seconds += p["phase_s"] - WARM_S
        for _name, t0, t1, status, code in p["heavy"]:
            if code is not None:
                codes[str(code)] += 1
            if status == 200 and code is None and WARM_S <= t1 <= p["phase_s"]:
                done += 1
                latencies.append((t1 - t0) * 1000)
    return {
        "runs_per_s": round(done / seconds, 1) if seconds else None,
        "completed_counted": done,
        "seconds_counted": seconds,
        "refused": dict(codes),
        "p50_ms": _r(percentile(latencies, 50)),
        "p99_ms": _r(percentile(latencies, 99)),
    }


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


#: The phases, in order: (server, loaded). Both servers serve the same deployment at once,
#: so the two halves of the goodput ratio alternate instead of following each other.
PHASES = (("on", False), ("on", True), ("off", True), ("on", True), ("off", True), ("on", False))


def overload_phases(
    urls: dict[str, str], handles: dict[str, Any], phase_s: float, tmp: Path, say: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The light tenant alone and loaded on the server with fair share on (ABBA), with loaded
    phases on the server with it off in between. Returns (on, off) summaries."""
    phases = []
    for i, (server, loaded) in enumerate(PHASES):
        p = _phase(urls[server], handles, phase_s, loaded, tmp, f"{server}-{i + 1}")
        p["server"] = server
        phases.append(p)
        say(
            f"overload phase {i + 1}, fair share {server}, {'loaded' if loaded else 'alone'}: light "
            f"{_light_stats(p['light'])}"
            + (f" heavy {_heavy_stats([p])}" if loaded else "")
            + f" server {p['capacity']}"
        )
        time.sleep(1.0)

    def pick(server: str, loaded: bool) -> list[dict[str, Any]]:
        return [p for p in phases if p["server"] == server and p["loaded"] == loaded]

    on = {
        "light_alone": _light_stats([o for p in pick("on", False) for o in p["light"]]),
        "light_loaded": _light_stats([o for p in pick("on", True) for o in p["light"]]),
        "heavy": _heavy_stats(pick("on", True)),
    }
    off = {
        "light_loaded": _light_stats([o for p in pick("off", True) for o in p["light"]]),
        "heavy": _heavy_stats(pick("off", True)),
    }
    return on, off


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _probe_b(http: httpx.Client, b: Any) -> float:
    """One instant async run of B: submitted-to-finished, ms (the run's own timestamps)."""
    headers = {"Authorization": f"Bearer {b.key}"}
    run = check(
        http.post(
            f"/v1/agents/{b.agent_id}/runs",
            headers=headers,
            json={"input": "probe", "output_tokens": 1, "mode": "async"},
        ),
        "slot probe",
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = check(http.get(f"/v1/runs/{run['id']}", headers=headers), "poll slot probe")
        if got["status"] in ("succeeded", "failed"):
            if got["status"] != "succeeded":
                raise SystemExit(f"slot probe run failed: {got}")
            return (_ts(got["finished_at"]) - _ts(got["created_at"])).total_seconds() * 1000
        time.sleep(0.01)
    raise SystemExit("slot probe run did not finish within 120 s")


def slot_wait(url: str, op_key: str, onboard: Onboard, say: Callable[[str], None]) -> dict[str, Any]:
    """B's async run latency idle, then while A's long runs hold every slot they can get."""
    op = {"Authorization": f"Bearer {op_key}"}
    with httpx.Client(base_url=url, timeout=60.0) as http:
        a = onboard(
            http,
            op_key,
            "slot-a",
            "pro",
            {"max_concurrent_runs": SLOT_A_RUNS, **HEAVY_LIMITS},
            SLOT_MODEL_LONG,
        )
        b = onboard(http, op_key, "slot-b", "pro", {}, SLOT_MODEL_B)
        _probe_b(http, b)  # warm-up
        idle = [_probe_b(http, b) for _ in range(SLOT_PROBES)]
        a_headers = {"Authorization": f"Bearer {a.key}"}
        for _ in range(SLOT_A_RUNS):
            check(
                http.post(
                    f"/v1/agents/{a.agent_id}/runs",
                    headers=a_headers,
                    json={"input": "long", "output_tokens": 1, "mode": "async"},
                ),
                "queue A's long run",
            )
        # Wait until A's running count stops growing: its runs hold every slot they can.
        running, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 2.0:
            runs = check(http.get("/v1/runs", headers=a_headers, params={"limit": 500}), "list A's runs")
            assert isinstance(runs, list)
            now = sum(1 for r in runs if r["status"] == "running")
            if now != running:
                running, stable_since = now, time.monotonic()
            time.sleep(0.2)
        loaded = [_probe_b(http, b) for _ in range(SLOT_PROBES)]
        check(http.post(f"/admin/tenants/{a.tenant_id}/suspend", headers=op), "suspend A")
    ratio = median(loaded) / median(idle)
    say(
        f"slot wait: B idle {[round(x, 1) for x in idle]} ms, with {running} of A's long runs running "
        f"{[round(x, 1) for x in loaded]} ms: ratio {ratio:.2f}"
    )
    return {
        "slot_wait_ratio": round(ratio, 3),
        "b_idle_ms": [round(x, 1) for x in idle],
        "b_loaded_ms": [round(x, 1) for x in loaded],
        "a_runs_queued": SLOT_A_RUNS,
        "a_runs_running_when_b_arrived": running,
        "a_model": SLOT_MODEL_LONG,
        "b_model": SLOT_MODEL_B,
        "latency": "run created_at to finished_at (server clock), median of "
        f"{SLOT_PROBES} sequential async runs",
    }
