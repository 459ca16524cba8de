"""The throughput baseline: the same agent run and SQLite writes behind a plain FastAPI route.

No tenancy at all: no API key, no tenant context, no rate limit, no concurrency cap, no
token budget, no agent lookup. What is left is the stack Patinox is built on, doing the
same work per run, so its throughput is the ceiling for that stack on this machine:

- FastAPI + uvicorn (one process, ``access_log`` off, log level ``warning``, as
  ``patinox serve``);
- the same pydantic-ai agent loop: :func:`patinox.agents.run_agent` on the same simulated
  model ids (**simulated**: an offline stand-in for an LLM, not a real model);
- the same number of SQLite writes as one Patinox sync run (:data:`WRITES_PER_RUN`, 9;
  ``bench/throughput.py`` counts Patinox's in the same run and reports both), in the same
  two transactions: transaction 1 takes a slot (a slot row), counts the run and its
  tokens (two counter updates) and inserts the run
  (``running``); transaction 2 updates the run with its result, inserts its usage and
  audit records, settles the token counter and deletes the slot. Same pragmas (WAL,
  ``synchronous=NORMAL``, foreign keys, busy timeout, ``secure_delete``, no automatic
  checkpoint) and the same WAL checkpoints on a background thread
  (:mod:`patinox.storage._checkpoint`), the same garbage-collector settings
  (:func:`patinox._process.server_gc`: start-up heap frozen, server thresholds), and tables of
  the same shape, but no tenant, no condition on any counter and no reads. Plain
  ``sqlite3`` on one connection, not SQLAlchemy: this is the ceiling, not a replica.

Run: ``python bench/baseline_app.py --port 8001 --db /tmp/baseline.db`` (``bench/throughput.py``
starts it). Routes: ``GET /healthz``; ``POST /agents/{name}/runs`` with
``{"input": str, "output_tokens": int | null}``, ``name`` one of :data:`AGENTS`;
``POST /agents/{name}/stream`` with a chat-completions body (``messages``: the last one's
``content`` is the input; ``max_tokens``): the same run and writes, its text streamed as
``chat.completion.chunk`` server-sent events as the model produces them (pydantic-ai's
streamed agent loop, as Patinox's streamed completions), ``data: [DONE]`` last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from patinox._process import server_gc
from patinox.agents import AgentDefinition, Conversation, RunEvent, RunLimits, RunOutcome, run_agent
from patinox.storage import _checkpoint

#: Agent name -> simulated model id (the same two agents bench/throughput.py creates in Patinox).
AGENTS = {"instant": "simulated:instant", "model20ms": "simulated:ttft_ms=20,tpot_ms=0"}
#: Instructions of both agents (also used for the Patinox agents).
INSTRUCTIONS = "You are a benchmark agent. Answer briefly."
#: SQLite writes (INSERT, UPDATE, DELETE) of one run: Patinox's count for a synchronous run
#: of a pool tenant (slot, 2 quota counters, run | run, usage, audit, token counter, slot
#: release).
WRITES_PER_RUN = 9
#: The enterprise plan's per-run limits (the Patinox bench tenant is on that plan).
LIMITS = RunLimits(max_output_tokens=32_768, max_tool_calls=128, timeout_s=900.0)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, agent TEXT NOT NULL, status TEXT NOT NULL, input TEXT NOT NULL,
  requested_output_tokens INTEGER, output TEXT, model TEXT NOT NULL, simulated INTEGER NOT NULL,
  input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, tool_calls INTEGER NOT NULL,
  error TEXT, created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, duration_ms REAL);
CREATE INDEX IF NOT EXISTS ix_runs_created_at ON runs (created_at);
CREATE TABLE IF NOT EXISTS usage_records (
  id TEXT PRIMARY KEY, run_id TEXT NOT NULL, at TEXT NOT NULL, model TEXT NOT NULL,
  simulated INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
  tool_calls INTEGER NOT NULL, duration_ms REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ix_usage_records_at ON usage_records (at);
CREATE TABLE IF NOT EXISTS slots (
  owner TEXT NOT NULL, run_id TEXT NOT NULL, held_by TEXT NOT NULL, until TEXT NOT NULL,
  PRIMARY KEY (owner, run_id));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, used INTEGER NOT NULL, held INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('runs', 0, 0), ('tokens', 0, 0);
CREATE TABLE IF NOT EXISTS audit_log (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, at TEXT NOT NULL,
  actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT, outcome TEXT NOT NULL, detail TEXT NOT NULL);
"""


class RunBody(BaseModel):
    """A run request (the same body as Patinox's ``POST /v1/agents/{id}/runs``)."""

    input: str = Field(min_length=1, max_length=1_000_000)
    output_tokens: int | None = Field(default=None, ge=1)


class RunOut(BaseModel):
    """The finished run (the fields Patinox answers)."""

    id: str
    agent: str
    status: str
    input: str
    output: str | None
    model: str
    simulated: bool
    requested_output_tokens: int | None
    input_tokens: int
    output_tokens: int
    tool_calls: int
    created_at: datetime
    started_at: datetime
    finished_at: datetime
    duration_ms: float


class _NoMemory:
    """A memory store for the run's tools (the bench agents have none)."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def memory_get(self, key: str) -> str | None:
        return self._values.get(key)

    def memory_put(self, key: str, value: str) -> None:
        self._values[key] = value

    def memory_list(self, prefix: str = "", limit: int = 100) -> list[str]:
        return sorted(k for k in self._values if k.startswith(prefix))[:limit]


def _open(db_path: str) -> sqlite3.Connection:
    """One autocommit connection with Patinox's SQLite pragmas and the baseline tables."""
    conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",
        "foreign_keys=ON",
        "busy_timeout=5000",
        "secure_delete=ON",
        "wal_autocheckpoint=0",
    ):
        conn.execute(f"PRAGMA {pragma}")
    conn.executescript(_SCHEMA)
    return conn


def _chunk(name: str, delta: dict[str, str], reason: str | None = None) -> bytes:
    """One ``chat.completion.chunk`` event."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    body = {"id": "chatcmpl-baseline", "object": "chat.completion.chunk", "created": int(time.time())}
    data = json.dumps({**body, "model": name, "choices": [choice]}, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _chunks(
    name: str, task: asyncio.Future[RunOut], events: asyncio.Queue[RunEvent | None]
) -> AsyncIterator[bytes]:
    """The streamed run's events as chunks, each write every event queued by then."""
    try:
        yield _chunk(name, {"role": "assistant", "content": ""})
        while (event := await events.get()) is not None:
            batch = [event]
            while not events.empty():
                more = events.get_nowait()
                if more is None:
                    events.put_nowait(None)
                    break
                batch.append(more)
            if data := b"".join(_chunk(name, {"content": e.text}) for e in batch if e.kind == "text"):
                yield data
        await task
        yield _chunk(name, {}, "stop") + b"data: [DONE]\n\n"
    finally:
        task.cancel()


def create_app(db_path: str) -> FastAPI:
    """The baseline app writing to the SQLite file ``db_path``."""
    app = FastAPI(title="patinox throughput baseline (no tenancy)")
    conn = _open(db_path)
    # WAL checkpoints on Patinox's background thread, as Patinox's own databases.
    _checkpoint.register(app, Path(db_path).resolve())
    memory = _NoMemory()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/agents/{name}/runs")
    async def create_run(name: str, body: RunBody) -> RunOut:
        model = AGENTS.get(name)
        if model is None:
            raise HTTPException(404, "no such agent")
        return await run(name, model, body)

    @app.post("/agents/{name}/stream")
    async def stream_run(name: str, body: dict[str, Any]) -> StreamingResponse:
        model = AGENTS.get(name)
        if model is None:
            raise HTTPException(404, "no such agent")
        req = RunBody(input=body["messages"][-1]["content"], output_tokens=body.get("max_tokens"))
        events: asyncio.Queue[RunEvent | None] = asyncio.Queue()
        task = asyncio.ensure_future(run(name, model, req, Conversation(on_event=events.put_nowait)))
        task.add_done_callback(lambda _: events.put_nowait(None))
        return StreamingResponse(_chunks(name, task, events), media_type="text/event-stream")

    async def run(name: str, model: str, body: RunBody, conversation: Conversation | None = None) -> RunOut:
        """One run with Patinox's writes in its two transactions; ``conversation`` streams it."""
        run_id, created = uuid.uuid4().hex, datetime.now(UTC)
        # Transaction 1: slot, counters and the run, as Patinox's admission transaction.
        with conn:
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO slots VALUES ('bench', ?, 'baseline', ?)", (run_id, created.isoformat())
            )
            conn.execute("UPDATE counters SET used = used + 1 WHERE name = 'runs'")
            conn.execute("UPDATE counters SET held = held + 1000 WHERE name = 'tokens'")
            conn.execute(
                "INSERT INTO runs (id, agent, status, input, requested_output_tokens, model, simulated,"
                " input_tokens, output_tokens, tool_calls, created_at, started_at)"
                " VALUES (?, ?, 'running', ?, ?, ?, 1, 0, 0, 0, ?, ?)",
                (
                    run_id,
                    name,
                    body.input,
                    body.output_tokens,
                    model,
                    created.isoformat(),
                    created.isoformat(),
                ),
            )
        outcome: RunOutcome = await run_agent(
            AgentDefinition(name=name, instructions=INSTRUCTIONS, model=model),
            body.input,
            output_tokens=body.output_tokens,
            limits=LIMITS,
            memory=memory,
            conversation=conversation,
        )
        finished = datetime.now(UTC)
        # Transaction 2: result, usage, audit, token settlement and slot release, as
        # Patinox's settlement transaction.
        with conn:
            conn.execute("BEGIN")
            conn.execute(
                "UPDATE runs SET status='succeeded', output=?, finished_at=?, input_tokens=?,"
                " output_tokens=?, tool_calls=?, duration_ms=? WHERE id=?",
                (
                    outcome.output,
                    finished.isoformat(),
                    outcome.input_tokens,
                    outcome.output_tokens,
                    outcome.tool_calls,
                    outcome.duration_ms,
                    run_id,
                ),
            )
            conn.execute(
                "INSERT INTO usage_records VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?)",
                (
                    uuid.uuid4().hex,
                    run_id,
                    finished.isoformat(),
                    outcome.model,
                    outcome.input_tokens,
                    outcome.output_tokens,
                    outcome.tool_calls,
                    outcome.duration_ms,
                ),
            )
            conn.execute(
                "INSERT INTO audit_log (id, at, actor, action, target, outcome, detail)"
                " VALUES (?, ?, 'bench', 'run.finish', ?, 'ok', ?)",
                (
                    uuid.uuid4().hex,
                    finished.isoformat(),
                    run_id,
                    json.dumps({"agent": name, "status": "succeeded"}),
                ),
            )
            used = outcome.input_tokens + outcome.output_tokens
            conn.execute(
                "UPDATE counters SET held = held - 1000, used = used + ? WHERE name = 'tokens'", (used,)
            )
            conn.execute("DELETE FROM slots WHERE owner = 'bench' AND run_id = ?", (run_id,))
        return RunOut(
            id=run_id,
            agent=name,
            status="succeeded",
            input=body.input,
            output=outcome.output,
            model=model,
            simulated=outcome.simulated,
            requested_output_tokens=body.output_tokens,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            tool_calls=outcome.tool_calls,
            created_at=created,
            started_at=created,
            finished_at=finished,
            duration_ms=outcome.duration_ms,
        )

    return app


def _main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--db", default=os.path.join(os.getcwd(), "baseline.db"), help="SQLite file")
    args = parser.parse_args()
    started = time.monotonic()
    app = create_app(args.db)
    print(
        f"baseline serving on http://{args.host}:{args.port} ({time.monotonic() - started:.2f} s)", flush=True
    )
    # The same collector settings as `patinox serve` (frozen start-up heap, server
    # thresholds: patinox._process), so the comparison is of the request path alone.
    with server_gc():
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    _main()
