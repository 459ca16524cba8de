"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

``model`` names one of the calling tenant's agents (its name or id); a foreign or missing
one answers 404 like every other missing object. A completion is a run of that agent,
through :meth:`~patinox.control.RunService.start` like ``POST /v1/agents/{id}/runs``: the
same admission (rate limits, quotas, concurrency, fair share), audit, usage record and
settlement. Errors answer in OpenAI's shape (:mod:`patinox.api._openai`).

Streaming (``stream: true``) runs at the ``namespace`` isolation level, where the run
executes in this process; a tenant at another level gets ``400 unsupported_parameter``
naming its level (``param`` ``stream``). Earlier turns of a conversation reach the model
at every level (they travel with the run to the tenant's execution process).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from patinox.agents import Conversation
from patinox.api._deps import Reader, RunWriter, Store
from patinox.api._logging import record_failure
from patinox.api._middleware import RATE_STATES
from patinox.api._openai import ChatCompletionRequest, ChunkWriter, completion_body, usage_body
from patinox.api._streams import SSE_HEADERS, StreamedRun, check_stream_level, start_streamed
from patinox.control import RunRequest
from patinox.errors import InvalidRequest, NotFound, PatinoxError
from patinox.runtime import Runtime
from patinox.storage import AgentRecord, TenantStore

router = APIRouter(prefix="/v1", tags=["openai"])

#: Agent ids start with this (an id is looked up first, then a name).
_AGENT_ID_PREFIX = "ag_"


def find_agent(store: TenantStore, model: str) -> AgentRecord:
    """The tenant's agent with id ``model`` or named ``model`` (both lookups go through the
    tenant store's cache).

    Raises:
        NotFound: no such agent for this tenant (a foreign one alike), field ``model``.
    """
    if model.startswith(_AGENT_ID_PREFIX):
        with contextlib.suppress(NotFound):
            return store.get_agent(model)
    try:
        return store.agent_named(model)
    except NotFound:
        raise NotFound(
            f"the model {model!r} does not exist (no agent of this tenant has that name or id)", field="model"
        ) from None


def _model_object(agent: AgentRecord) -> dict[str, Any]:
    return {
        "id": agent["name"],
        "object": "model",
        "created": int(agent["created_at"].timestamp()),
        "owned_by": "tenant",
    }


@router.get("/models")
def list_models(_: Reader, store: Store) -> dict[str, Any]:
    """The tenant's agents as OpenAI model objects (``id`` is the agent's name)."""
    return {"object": "list", "data": [_model_object(a) for a in store.list_agents()]}


@router.get("/models/{model}")
def get_model(model: str, _: Reader, store: Store) -> dict[str, Any]:
    """One agent as an OpenAI model object. 404 for a missing or foreign name or id."""
    return _model_object(find_agent(store, model))


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, ctx: RunWriter, request: Request
) -> JSONResponse | StreamingResponse:
    """A chat completion by one of the tenant's agents (see the module docstring).

    ``max_completion_tokens`` (or ``max_tokens``) is the run's ``output_tokens``; client
    ``system`` (and ``developer``) messages follow the agent's own instructions.
    Errors: 400 ``unsupported_parameter``, 401, 403, 404, 422 ``invalid_request``, 429
    (``Retry-After``; a spent quota also ``x-should-retry: false``), 502 ``run_failed``,
    503. An error after a stream began arrives as an error event.
    """
    rt: Runtime = request.app.state.runtime
    body.refuse_unsupported()
    prompt, history = body.conversation()
    if body.stream:
        check_stream_level(ctx, param="stream")
    agent = find_agent(rt.backend.tenant_store(ctx), body.model)
    try:
        req = RunRequest(input=prompt, output_tokens=body.output_tokens())
    except ValidationError as err:
        raise InvalidRequest(f"messages: {err.errors()[0]['msg']}", field="messages") from None
    states = request.scope["state"][RATE_STATES]
    if not body.stream:
        conversation = Conversation(history=history) if history else None
        row = await rt.runs.start(ctx, agent["id"], req, rate_states=states, conversation=conversation)
        usage = usage_body(row["input_tokens"], row["output_tokens"])
        created = int(row["created_at"].timestamp())
        return JSONResponse(
            completion_body(
                run_id=row["id"], model=body.model, created=created, output=row["output"] or "", usage=usage
            )
        )
    streamed = await start_streamed(rt, ctx, agent["id"], req, rate_states=states, history=history)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    writer = ChunkWriter(
        completion_id=f"chatcmpl-{streamed.run_id}", model=body.model, include_usage=include_usage
    )
    return StreamingResponse(
        _stream(request, streamed, writer), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _stream(request: Request, streamed: StreamedRun, writer: ChunkWriter) -> AsyncIterator[bytes]:
    """The completion's chunks as the run produces them; a client that goes away cancels
    the run (settled as cancelled, charged what it used)."""
    try:
        yield writer.role()
        async for batch in streamed.batches():
            if data := b"".join(writer.content(event.text) for event in batch if event.kind == "text"):
                yield data
        try:
            row = streamed.run.result()
        except PatinoxError as err:
            record_failure(request.scope, err)
            yield ChunkWriter.error(err.http_status, err.to_dict())
            return
        usage = usage_body(row["input_tokens"], row["output_tokens"])
        yield writer.finish("stop") + writer.usage(usage) + ChunkWriter.done()
    finally:
        streamed.cancel()
