"""Tenant routes for conversation threads under ``/v1/threads``.

A thread holds a conversation's messages, stored sealed under the tenant's DEK; a run on
a thread (``POST /v1/threads/{id}/runs``) passes them to the model as message history and,
when it succeeds, appends its input and the agent's reply (see
:mod:`patinox.control.threads`). Scopes: ``runs:write`` to create, delete and run on a
thread, ``read`` to read. Another tenant's thread answers 404 ``not_found`` exactly like a
missing one. The creates take an ``Idempotency-Key`` like every create.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from patinox.api import schemas as o
from patinox.api._deps import RT, Reader, RunWriter, Store
from patinox.api._idempotency import Created, idempotent
from patinox.api._middleware import RATE_STATES
from patinox.api.routers.tenant import _run_out
from patinox.control.threads import ThreadRunRequest, ThreadService, ThreadSpec
from patinox.runtime import Runtime
from patinox.storage import MessageRecord, ThreadRecord

router = APIRouter(prefix="/v1/threads", tags=["threads"])


class ThreadOut(BaseModel):
    """A thread."""

    model_config = ConfigDict(extra="ignore")

    id: str
    metadata: dict[str, str]
    messages: int = Field(
        description="messages the thread holds now (at most the plan's max_thread_messages)"
    )
    created_at: datetime
    updated_at: datetime = Field(description="when a message was last added (or the thread made)")


class MessageOut(BaseModel):
    """One message of a thread."""

    model_config = ConfigDict(extra="ignore")

    id: str
    thread_id: str
    position: int = Field(description="1, 2, ... within the thread; kept when older messages are dropped")
    role: str = Field(description="user | assistant")
    content: str
    run_id: str | None = Field(description="the run that added it")
    created_at: datetime


class ThreadRunOut(BaseModel):
    """A run on a thread: the run, and the messages it appended."""

    model_config = ConfigDict(extra="ignore")

    thread_id: str
    run: o.RunOut
    messages: list[MessageOut] = Field(description="the user's input and the agent's reply, appended")


_IDEM = (
    "; with an ``Idempotency-Key``: 400 ``invalid_idempotency_key``, 409 ``idempotency_in_progress``,"
    " 422 ``idempotency_key_reused``"
)
_NOT_FOUND = "``not_found``: no such thread (another tenant's alike)"


def _thread_out(row: ThreadRecord) -> ThreadOut:
    return ThreadOut.model_validate(row)


def _message_out(row: MessageRecord) -> MessageOut:
    return MessageOut.model_validate(row)


def _service(rt: Runtime) -> ThreadService:
    return ThreadService(rt.backend, rt.runs)


@router.post(
    "",
    status_code=201,
    response_model=ThreadOut,
    responses={
        201: {"description": "the new thread, with ``Location: /v1/threads/{id}``"},
        409: {"model": o.ErrorOut, "description": f"``idempotency_in_progress``{_IDEM}"},
        422: {"model": o.ErrorOut, "description": f"``invalid_request``: metadata too large{_IDEM}"},
        429: {"model": o.ErrorOut, "description": "``quota_exceeded``: the plan's ``max_threads`` are held"},
    },
)
async def create_thread(
    ctx: RunWriter, rt: RT, request: Request, spec: Annotated[ThreadSpec | None, Body()] = None
) -> Response:
    """Create an empty thread (201, ``Location``). The body is optional: ``{"metadata":
    {"k": "v"}}``, at most 16 entries, keys 1-64 and values at most 512 characters."""

    async def create() -> Created:
        thread = _service(rt).create(ctx, spec or ThreadSpec())
        return 201, _thread_out(thread), {"Location": f"/v1/threads/{thread['id']}"}

    return await idempotent(request.scope, lambda: rt.backend.tenant_store(ctx), create)


@router.get(
    "", responses={200: {"description": 'the page; ``Link: <...>; rel="next"`` when more may follow'}}
)
def list_threads(
    _: Reader,
    store: Store,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[
        str | None, Query(max_length=40, description="a thread id: threads older than it")
    ] = None,
) -> list[ThreadOut]:
    """Threads, newest first, ``limit`` at most (1-500, default 50). When the page is full,
    ``Link: </v1/threads?limit=N&before=ID>; rel="next"`` names the next one (empty when
    the page ended exactly at the last thread). 404 when ``before`` is not a thread of the
    tenant."""
    threads = store.threads().list_threads(limit=limit, before=before)
    if len(threads) == limit:
        query = urlencode({"limit": limit, "before": threads[-1]["id"]})
        response.headers["Link"] = f'</v1/threads?{query}>; rel="next"'
    return [_thread_out(t) for t in threads]


@router.get("/{thread_id}", responses={404: {"model": o.ErrorOut, "description": _NOT_FOUND}})
def get_thread(thread_id: str, _: Reader, store: Store) -> ThreadOut:
    """The thread, with how many messages it holds."""
    return _thread_out(store.threads().get(thread_id))


@router.delete(
    "/{thread_id}", status_code=204, responses={404: {"model": o.ErrorOut, "description": _NOT_FOUND}}
)
def delete_thread(thread_id: str, ctx: RunWriter, rt: RT) -> Response:
    """Delete the thread and its messages (204), in one transaction; audited."""
    _service(rt).delete(ctx, thread_id)
    return Response(status_code=204)


@router.get(
    "/{thread_id}/messages",
    responses={
        200: {"description": 'the page; ``Link: <...>; rel="next"`` when more may follow'},
        404: {"model": o.ErrorOut, "description": f"{_NOT_FOUND}, or ``after`` is not a message of it"},
    },
)
def list_messages(
    thread_id: str,
    _: Reader,
    store: Store,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    after: Annotated[str | None, Query(max_length=40, description="a message id: messages after it")] = None,
) -> list[MessageOut]:
    """The thread's messages, oldest first, ``limit`` at most (1-500, default 100). When the
    page is full, ``Link: </v1/threads/{id}/messages?limit=N&after=ID>; rel="next"``."""
    messages = store.threads().messages(thread_id, limit=limit, after=after)
    if len(messages) == limit:
        query = urlencode({"limit": limit, "after": messages[-1]["id"]})
        response.headers["Link"] = f'</v1/threads/{thread_id}/messages?{query}>; rel="next"'
    return [_message_out(m) for m in messages]


_RUN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the finished run and the two messages it appended"},
    404: {"model": o.ErrorOut, "description": f"{_NOT_FOUND}; or no such agent"},
    409: {"model": o.ErrorOut, "description": f"``idempotency_in_progress``{_IDEM}"},
    502: {
        "model": o.ErrorOut,
        "description": "``run_failed``: the run failed or was cancelled (``run_id`` in the details); "
        "nothing was appended to the thread",
    },
}


@router.post("/{thread_id}/runs", response_model=ThreadRunOut, responses=_RUN_RESPONSES)
async def run_on_thread(thread_id: str, req: ThreadRunRequest, ctx: RunWriter, request: Request) -> Response:
    """Run an agent on the thread, synchronously: ``{"agent_id", "input", "output_tokens"?}``.

    The thread's messages are the model's message history (they count in the run's
    worst-case token reservation); when the run succeeds, its input and the agent's reply
    are appended and the oldest messages beyond the plan's ``max_thread_messages`` dropped.
    A failed or cancelled run appends nothing (502 ``run_failed``). Admission refuses
    exactly as for ``POST /v1/agents/{id}/runs`` (429, 422 ``exceeds_budget``, ...).
    Takes an ``Idempotency-Key``: a retry answers the first response and runs nothing."""
    rt: Runtime = request.app.state.runtime
    states = request.scope["state"][RATE_STATES]

    async def run() -> Created:
        row, appended = await _service(rt).run(ctx, thread_id, req, rate_states=states)
        out = ThreadRunOut(
            thread_id=thread_id, run=_run_out(row), messages=[_message_out(m) for m in appended]
        )
        return 200, out, {}

    return await idempotent(request.scope, lambda: rt.backend.tenant_store(ctx), run)
