"""Streamed runs over HTTP: start a run whose events arrive as it goes, and the native
route's server-sent events (``"mode": "stream"`` on ``POST /v1/agents/{id}/runs``).

A streamed run is a synchronous run (the same admission, settlement, audit and usage
record) with a :class:`~patinox.agents.Conversation` callback that queues its events; the
response starts once the run was admitted and recorded, so every refusal (404, 422, 429,
503) is an ordinary error response. A client that disconnects cancels the run, which is
settled as cancelled and charged what it used.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from patinox.agents import Conversation, RunEvent
from patinox.agents.runner import Role
from patinox.api._logging import record_failure
from patinox.control import RunRequest
from patinox.errors import PatinoxError, UnsupportedParameter
from patinox.limits import RateLimitState
from patinox.runtime import Runtime
from patinox.storage import RunRecord
from patinox.tenancy import IsolationLevel, TenantContext

#: Headers of every event stream: not cached, not buffered by a proxy.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def check_stream_level(ctx: TenantContext, *, param: str = "mode", what: str = "streaming") -> None:
    """Streams run at the ``namespace`` level only: a run's events do not cross out of an
    execution process yet (its history does, see ``RunExecutor``).

    Raises:
        UnsupportedParameter: the tenant runs at another level (field ``param``, and
            ``isolation_level``).
    """
    if ctx.isolation_level is IsolationLevel.NAMESPACE:
        return
    raise UnsupportedParameter(
        f"{what} is not available at this tenant's isolation level "
        f"{ctx.isolation_level.value!r} (only at 'namespace')",
        field=param,
        isolation_level=ctx.isolation_level.value,
    )


@dataclass(eq=False)
class StreamedRun:
    """A run admitted and started, its events queued as they happen.

    Attributes:
        run_id: the run's id.
        run: the run's future: the finished run, or the error it failed with.
        events: the run's events after ``started``; ``None`` once the run is over.
    """

    run_id: str
    run: asyncio.Future[RunRecord]
    events: asyncio.Queue[RunEvent | None]

    async def batches(self) -> AsyncIterator[list[RunEvent]]:
        """The run's events until it ends, each batch every event queued by the time the
        previous one was sent (one write to the client for events produced together)."""
        while (event := await self.events.get()) is not None:
            batch = [event]
            while not self.events.empty():
                nxt = self.events.get_nowait()
                if nxt is None:
                    self.events.put_nowait(None)  # the end, after this batch
                    break
                batch.append(nxt)
            yield batch

    def cancel(self) -> None:
        """Stop the run if it still runs (its client went away)."""
        if not self.run.done():
            self.run.cancel()


async def start_streamed(
    rt: Runtime,
    ctx: TenantContext,
    agent_id: str,
    req: RunRequest,
    *,
    rate_states: list[RateLimitState],
    history: tuple[tuple[Role, str], ...] = (),
) -> StreamedRun:
    """Start a synchronous run of ``req`` that streams; return once it started.

    Raises:
        Whatever :meth:`~patinox.control.RunService.start` raises before the run starts
        (refusals: nothing was run).
    """
    events: asyncio.Queue[RunEvent | None] = asyncio.Queue()
    conversation = Conversation(history=history, on_event=events.put_nowait)
    run = asyncio.ensure_future(
        rt.runs.start(ctx, agent_id, req, rate_states=rate_states, conversation=conversation)
    )
    run.add_done_callback(lambda _: events.put_nowait(None))
    run.add_done_callback(_retrieved)
    try:
        first = await events.get()
    except asyncio.CancelledError:
        run.cancel()
        raise
    if first is None:
        run.result()  # the refusal, raised here
        raise RuntimeError("a streamed run ended without starting")
    return StreamedRun(first.run_id, run, events)


def _retrieved(run: asyncio.Future[RunRecord]) -> None:
    """Mark the run's error as seen: a stream whose client went away never reads it (the
    run recorded it)."""
    if not run.cancelled():
        run.exception()


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _native_event(event: RunEvent) -> bytes | None:
    if event.kind == "text":
        return _sse("text.delta", {"text": event.text})
    if event.kind == "tool_call":
        return _sse(
            "tool.call",
            {
                "tool_name": event.tool_name,
                "tool_call_id": event.tool_call_id,
                "args": json.loads(event.args or "{}"),
            },
        )
    if event.kind == "tool_result":
        return _sse(
            "tool.result",
            {
                "tool_name": event.tool_name,
                "tool_call_id": event.tool_call_id,
                "outcome": event.outcome,
                "result": event.result,
            },
        )
    return None


def native_stream(
    request: Request, streamed: StreamedRun, run_out: Callable[[RunRecord], Any]
) -> StreamingResponse:
    """The native route's event stream: ``run.started`` (``{"run_id"}``), then
    ``text.delta`` (``{"text"}``), ``tool.call`` (``{"tool_name", "tool_call_id", "args"}``)
    and ``tool.result`` (``{"tool_name", "tool_call_id", "outcome", "result"}``) as they
    happen, and last either ``run.completed`` (the run record, as ``GET /v1/runs/{id}``
    answers it) or ``error`` (``{"error": {"code", "message", "details"}}``, the run
    recorded as failed)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            yield _sse("run.started", {"run_id": streamed.run_id})
            async for batch in streamed.batches():
                if data := b"".join(chunk for event in batch if (chunk := _native_event(event)) is not None):
                    yield data
            try:
                row = streamed.run.result()
            except PatinoxError as err:
                record_failure(request.scope, err)
                yield _sse("error", {"error": err.to_dict()})
                return
            yield _sse("run.completed", run_out(row).model_dump(mode="json"))
        finally:
            streamed.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
