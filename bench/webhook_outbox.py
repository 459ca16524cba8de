"""What webhooks cost a run's settlement: synchronous runs/s of a tenant without webhook
endpoints beside one with three (each of its runs' settlements then writes three outbox
rows in the same transaction), in interleaved blocks of 100 runs, one process, an
embedded SQLite deployment in a temporary directory, no queue worker (nothing is sent:
the outbox write alone is measured). Prints each cell's median runs/s and their ratio,
and the statements each cell's runs made that read ``webhook_endpoints`` (per run): the
settlement's lookup of the tenant's active endpoints, served from the control-plane cache
once read (SQLite; the cache is off on PostgreSQL).

    .venv/bin/python bench/webhook_outbox.py [blocks]   # default 6
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import event

from patinox.api import create_app
from patinox.runtime import Runtime, Settings
from patinox.storage.crypto import FileKeyProvider

SCOPES = ["agents:write", "runs:write", "read", "webhooks:write"]
RUNS_PER_BLOCK = 100


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def main(blocks: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="patinox-bench-webhooks-"))
    FileKeyProvider.create(root / "kek.json")
    settings = Settings(
        database_url=f"sqlite:///{root / 'patinox.db'}",
        kek_url=f"file://{root / 'kek.json'}",
        embedded_workers=0,
    )
    rt = Runtime.build(settings)
    op = _auth(rt.keys.create(tenant_id=None, name="bench", scopes=None, actor="bench").secret)
    with TestClient(create_app(runtime=rt)) as c:

        def tenant(name: str, endpoints: int) -> tuple[dict[str, str], str]:
            tid = c.post("/admin/tenants", json={"name": name, "plan": "enterprise"}, headers=op).json()["id"]
            key = c.post(
                f"/admin/tenants/{tid}/keys", json={"name": "k", "scopes": SCOPES}, headers=op
            ).json()
            h = _auth(key["key"])
            agent = c.post("/v1/agents", json={"name": "a", "model": "simulated:instant"}, headers=h).json()[
                "id"
            ]
            for i in range(endpoints):
                body = {"url": f"https://hooks-{i}.example.com/", "event_types": ["run.succeeded"]}
                assert c.post("/v1/webhooks", json=body, headers=h).status_code == 201
            return h, agent

        cells = {"no endpoint": tenant("none", 0), "3 endpoints": tenant("three", 3)}
        rates: dict[str, list[float]] = {name: [] for name in cells}
        reads: dict[str, int] = dict.fromkeys(cells, 0)
        current = [""]

        def count(conn: object, cursor: object, statement: str, *args: object) -> None:
            if "FROM webhook_endpoints" in statement:
                reads[current[0]] += 1

        event.listen(rt.backend.engine, "before_cursor_execute", count)
        for _ in range(blocks):
            for name, (h, agent) in cells.items():
                current[0] = name
                started = time.perf_counter()
                for _ in range(RUNS_PER_BLOCK):
                    r = c.post(
                        f"/v1/agents/{agent}/runs", json={"input": "hi", "output_tokens": 4}, headers=h
                    )
                    assert r.status_code == 200, r.text
                rates[name].append(RUNS_PER_BLOCK / (time.perf_counter() - started))
    rt.close()
    for name, values in rates.items():
        median = statistics.median(values)
        per_run = reads[name] / (len(values) * RUNS_PER_BLOCK)
        print(
            f"{name}: median {median:.1f} runs/s ({len(values)} blocks of {RUNS_PER_BLOCK}),"
            f" {per_run:.3f} webhook_endpoints reads per run"
        )
    ratio = statistics.median(rates["3 endpoints"]) / statistics.median(rates["no endpoint"])
    print(f"3 endpoints / no endpoint: {ratio:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6)
