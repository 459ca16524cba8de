"""Open-loop HTTP load for ``bench/noisy_neighbour.py``: send runs at fixed wall times.

Used two ways:

- imported by ``noisy_neighbour.py``, which sends the well-behaved tenants' runs from its
  own event loop (:func:`send_all`);
- as a child process (``python bench/_nn_load.py SPEC.json OUT.json``) that sends the
  aggressor's runs, so the aggressor's client work never shares an event loop with the
  victims' latency measurement. Both sides schedule by the same absolute wall-clock start
  (``start_at``, seconds since the epoch), so the two streams overlap as planned.

Every request is sent at ``start_at + offset_s`` (never earlier; lateness does not
accumulate), concurrently, without retries. An outcome per request is recorded: HTTP
status, error code (``error.code`` of a JSON error body; ``timeout``/``transport_error``
for transport failures), client wall latency in milliseconds and send lag.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True, kw_only=True, slots=True)
class Send:
    """One run to send: whose, when (seconds after the start) and how big (tokens = words)."""

    tenant: str
    key: str
    agent_id: str
    offset_s: float
    prompt_tokens: int
    output_tokens: int
    mode: str = "sync"


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """What one request got. ``latency_ms`` is client wall time from send to full answer."""

    tenant: str
    offset_s: float
    prompt_tokens: int
    output_tokens: int
    status: int  # HTTP status; 0 for a transport failure
    code: str | None  # error code, None on success
    latency_ms: float
    lag_ms: float  # how late the send was against its due time


def _prompt(words: int) -> str:
    """Exactly ``words`` whitespace-separated words (the simulated tokenizer's tokens)."""
    return " ".join(["token"] * words)


def _error_code(r: httpx.Response) -> str | None:
    if r.is_success:
        try:
            body = r.json()
        except ValueError:
            return "bad_response"
        status = body.get("status") if isinstance(body, dict) else None
        if status in ("succeeded", "queued"):
            return None
        return f"run_{status}"
    try:
        body = r.json()
        code = body["error"]["code"]
        return str(code)
    except (ValueError, KeyError, TypeError):
        return f"http_{r.status_code}"


async def _one(client: httpx.AsyncClient, s: Send, due: float, loop: asyncio.AbstractEventLoop) -> Outcome:
    lag = max(0.0, loop.time() - due)
    t0 = time.perf_counter()
    try:
        r = await client.post(
            f"/v1/agents/{s.agent_id}/runs",
            headers={"Authorization": f"Bearer {s.key}"},
            json={"input": _prompt(s.prompt_tokens), "output_tokens": s.output_tokens, "mode": s.mode},
        )
        status, code = r.status_code, _error_code(r)
    except httpx.TimeoutException:
        status, code = 0, "timeout"
    except httpx.HTTPError:
        status, code = 0, "transport_error"
    return Outcome(
        tenant=s.tenant,
        offset_s=s.offset_s,
        prompt_tokens=s.prompt_tokens,
        output_tokens=s.output_tokens,
        status=status,
        code=code,
        latency_ms=(time.perf_counter() - t0) * 1000.0,
        lag_ms=lag * 1000.0,
    )


async def send_all(
    base_url: str, sends: list[Send], *, start_at: float, max_connections: int = 256, timeout_s: float = 120.0
) -> list[Outcome]:
    """Send every run at ``start_at + offset_s`` (epoch seconds); return the outcomes in send order."""
    loop = asyncio.get_running_loop()
    start = loop.time() + (start_at - time.time())
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    ordered = sorted(sends, key=lambda s: s.offset_s)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        tasks: list[asyncio.Task[Outcome]] = []
        for s in ordered:
            due = start + s.offset_s
            while (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, s, due, loop)))
        return list(await asyncio.gather(*tasks))


def main(argv: list[str]) -> None:
    """Child-process entry: ``_nn_load.py SPEC.json OUT.json``.

    SPEC: ``{"base_url", "start_at", "sends": [Send fields...]}``; OUT: a list of outcomes.
    """
    spec: dict[str, Any] = json.loads(Path(argv[0]).read_text())
    sends = [Send(**s) for s in spec["sends"]]
    outcomes = asyncio.run(send_all(spec["base_url"], sends, start_at=float(spec["start_at"])))
    Path(argv[1]).write_text(json.dumps([asdict(o) for o in outcomes]))


if __name__ == "__main__":
    main(sys.argv[1:])
