"""Two `patinox serve` and two `patinox worker` processes on one PostgreSQL and one Redis:
every limit holds across them, and the queue stays fair.

This is the documented multi-process deployment (README, "Running several processes"),
started for real: separate OS processes, real PostgreSQL (application role), real Redis,
the run's own (``pg_deployment``, ``redis_url``), whose URLs the processes are given.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from patinox.storage import open_backend
from patinox.storage.crypto import FileKeyProvider, key_provider_from_url
from patinox.storage.postgres import PostgresDeployment
from tests.conftest import Deployment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(
    deployment: Deployment, pg_deployment: PostgresDeployment, redis_url: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    kek = tmp_path / "kek.json"
    FileKeyProvider.create(kek)
    backend = open_backend(
        pg_deployment.app_url,
        owner_url=pg_deployment.owner_url,
        key_provider=key_provider_from_url(f"file://{kek}"),
    )
    from patinox.control import ApiKeys

    admin_key = ApiKeys(backend).create(tenant_id=None, name="op", scopes=None, actor="test").secret
    backend.close()
    env = {
        **os.environ,
        "PATINOX_DATABASE_URL": pg_deployment.app_url,
        "PATINOX_OWNER_URL": pg_deployment.owner_url,
        "PATINOX_KEK_URL": f"file://{kek}",
        "PATINOX_RATE_LIMIT_URL": redis_url,
        "PATINOX_EMBEDDED_WORKERS": "0",
        "PATINOX_DATA_DIR": str(tmp_path),
    }
    ports = [_free_port(), _free_port()]
    procs = [
        subprocess.Popen([sys.executable, "-m", "patinox", "serve", "--port", str(p)], env=env) for p in ports
    ] + [
        subprocess.Popen([sys.executable, "-m", "patinox", "worker", "--concurrency", "4"], env=env)
        for _ in range(2)
    ]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url in urls:
            deadline = time.monotonic() + 120  # a loaded 2-core machine starts slowly
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"server {url} did not start")
                time.sleep(0.1)
        yield {"urls": urls, "admin": {"Authorization": f"Bearer {admin_key}"}}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _tenant(
    c: dict[str, Any], plan: str, limits: dict[str, Any], model: str = "simulated:ttft_ms=300,tpot_ms=0"
) -> dict[str, str]:
    url = c["urls"][0]
    name = f"t-{uuid.uuid4().hex[:8]}"
    t = httpx.post(
        f"{url}/admin/tenants", json={"name": name, "plan": plan, "limits": limits}, headers=c["admin"]
    )
    assert t.status_code == 201, t.text
    k = httpx.post(f"{url}/admin/tenants/{t.json()['id']}/keys", json={"name": "k"}, headers=c["admin"])
    h = {"Authorization": f"Bearer {k.json()['key']}"}
    a = httpx.post(f"{url}/v1/agents", json={"name": "a", "model": model}, headers=h)
    assert a.status_code == 201, a.text
    return {"id": t.json()["id"], "agent": a.json()["id"], "auth": h["Authorization"]}


def _run(c: dict[str, Any], t: dict[str, str], i: int, **body: Any) -> httpx.Response:
    url = c["urls"][i % 2]
    return httpx.post(
        f"{url}/v1/agents/{t['agent']}/runs",
        json={"input": "hello", "output_tokens": 1, **body},
        headers={"Authorization": t["auth"]},
        timeout=60,
    )


pytestmark = pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)


def test_limits_hold_across_two_servers(cluster: dict[str, Any]) -> None:
    # Rate: 12 per minute (one already spent creating the agent), 20 requests alternating
    # between the two servers.
    r = _tenant(cluster, "free", {"requests_per_minute": 12})
    codes = [
        httpx.get(f"{cluster['urls'][i % 2]}/v1/agents", headers={"Authorization": r["auth"]}).status_code
        for i in range(20)
    ]
    assert codes.count(200) == 11 and codes.count(429) == 9, codes

    # Concurrency: 2 at once, 6 simultaneous runs spread over both servers.
    c = _tenant(cluster, "free", {"max_concurrent_runs": 2, "requests_per_minute": 1000})
    results: list[int] = []
    barrier = threading.Barrier(6)

    def go(i: int) -> None:
        barrier.wait()
        results.append(_run(cluster, c, i).status_code)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == [200, 200, 429, 429, 429, 429], results

    # Token budget: 30 tokens a day; each run reserves and uses 2 ("hello" + 1 output).
    b = _tenant(
        cluster, "free", {"tokens_per_day": 30, "requests_per_minute": 1000, "max_concurrent_runs": 64}
    )
    codes = []
    lock = threading.Lock()

    def spend(i: int) -> None:
        code = _run(cluster, b, i).status_code
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(24)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert codes.count(200) == 15 and codes.count(429) == 9, codes
    usage = httpx.get(f"{cluster['urls'][1]}/v1/usage", headers={"Authorization": b["auth"]}).json()
    assert usage["tokens_today"] == 30


def test_queue_is_fair_and_complete_across_two_workers(cluster: dict[str, Any]) -> None:
    slow = "simulated:ttft_ms=3000,tpot_ms=0"
    heavy = _tenant(cluster, "free", {"requests_per_minute": 10_000, "max_concurrent_runs": 8}, slow)
    light = _tenant(cluster, "free", {"requests_per_minute": 10_000, "max_concurrent_runs": 8}, slow)
    heavy_ids: list[str] = []
    lock = threading.Lock()

    def enqueue(i: int) -> None:
        run_id = _run(cluster, heavy, i, mode="async").json()["id"]
        with lock:
            heavy_ids.append(run_id)

    threads = [threading.Thread(target=enqueue, args=(i,)) for i in range(60)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    light_id = _run(cluster, light, 0, mode="async").json()["id"]

    def runs(t: dict[str, str]) -> list[dict[str, Any]]:
        got = httpx.get(
            f"{cluster['urls'][0]}/v1/runs?limit=100", headers={"Authorization": t["auth"]}, timeout=30
        ).json()
        return list(got)

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if all(r["status"] == "succeeded" for r in runs(heavy)) and runs(light)[0]["status"] == "succeeded":
            break
        time.sleep(0.5)
    done_heavy = sorted(r["finished_at"] for r in runs(heavy))
    light_done = runs(light)[0]["finished_at"]
    assert len(done_heavy) == 60 and all(r["status"] == "succeeded" for r in runs(heavy))
    # The light tenant's single run was not served after the heavy backlog (8 runs of 3 s at
    # once: the backlog takes about 23 s): it went ahead of most of the heavy runs queued
    # before it (at most about two rounds of 8), instead of waiting behind all 60.
    before = sum(1 for f in done_heavy if f < light_done)
    spans = sorted((r["started_at"], r["finished_at"], r["duration_ms"], r["model"]) for r in runs(heavy))
    assert before <= 32, (before, light_done, spans)
    assert light_id and heavy_ids
