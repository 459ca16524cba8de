"""Closed-loop HTTP load for ``bench/noisy_neighbour.py``'s overload figures.

Run as a child process (``python bench/_nn_closed.py SPEC.json OUT.json``) so that its
client work never shares an event loop with the light tenant's latency measurement. Each
tenant in the spec runs ``loops`` closed loops from ``start_at`` (seconds since the epoch)
until ``stop_at``: each loop sends one synchronous run, waits for its answer, and sends
the next at once. A refusal with ``Retry-After`` (``503 overloaded``, ``429``) is waited
out as the official OpenAI SDK does (it honours up to 60 s), so a refused loop does not
spin. One record per request: tenant, start and end (seconds after
``start_at``), HTTP status and error code.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

#: Longest pause after a refusal, seconds (Retry-After above this is cut to it), as the
#: official OpenAI SDK's retry logic honours it.
MAX_BACKOFF_S = 60.0


async def _loop(
    client: httpx.AsyncClient,
    tenant: dict[str, Any],
    origin: float,
    stop: float,
    records: list[tuple[str, float, float, int, str | None]],
) -> None:
    body = {"input": tenant["input"], "output_tokens": tenant["output_tokens"]}
    headers = {"Authorization": f"Bearer {tenant['key']}"}
    path = f"/v1/agents/{tenant['agent_id']}/runs"
    loop = asyncio.get_running_loop()
    while loop.time() < stop:
        t0 = loop.time()
        code: str | None = None
        retry = 0.0
        try:
            r = await client.post(path, headers=headers, json=body)
            status = r.status_code
            if status >= 300:
                try:
                    code = str(r.json()["error"]["code"])
                except (ValueError, KeyError, TypeError):
                    code = f"http_{status}"
                retry = min(MAX_BACKOFF_S, float(r.headers.get("retry-after", "0") or 0))
        except httpx.TimeoutException:
            status, code = 0, "timeout"
        except httpx.HTTPError:
            status, code = 0, "transport_error"
        records.append((tenant["name"], t0 - origin, loop.time() - origin, status, code))
        if retry > 0:
            await asyncio.sleep(retry)


async def run(spec: dict[str, Any]) -> list[tuple[str, float, float, int, str | None]]:
    """Run every tenant's loops from ``start_at`` until ``stop_at``; return the records."""
    loop = asyncio.get_running_loop()
    origin = loop.time() + (float(spec["start_at"]) - time.time())
    stop = origin + (float(spec["stop_at"]) - float(spec["start_at"]))
    records: list[tuple[str, float, float, int, str | None]] = []
    clients = []
    tasks = []
    while (delay := origin - loop.time()) > 0:
        await asyncio.sleep(delay)
    for tenant in spec["tenants"]:
        n = int(tenant["loops"])
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        client = httpx.AsyncClient(base_url=spec["base_url"], timeout=60.0, limits=limits)
        clients.append(client)
        tasks += [asyncio.create_task(_loop(client, tenant, origin, stop, records)) for _ in range(n)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for c in clients:
            await c.aclose()
    return records


def main(argv: list[str]) -> None:
    """Child-process entry: ``_nn_closed.py SPEC.json OUT.json``.

    SPEC: ``{"base_url", "start_at", "stop_at", "tenants": [{"name", "key", "agent_id",
    "loops", "input", "output_tokens"}]}``; OUT: a list of ``[tenant, start_s, end_s,
    status, code]``.
    """
    spec: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    records = asyncio.run(run(spec))
    Path(argv[1]).write_text(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1:])
