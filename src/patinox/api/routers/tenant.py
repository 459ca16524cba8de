"""Tenant routes under ``/v1``: agents, runs, memory, usage, audit.

Every handler reaches data through the request tenant's :class:`~patinox.storage.TenantStore`;
no handler takes a tenant id from the path, a header or the body.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response

from patinox.agents import is_simulated
from patinox.api import schemas as o
from patinox.api._deps import RT, AgentWriter, Reader, RunWriter, Store
from patinox.api._idempotency import Created, idempotent
from patinox.api._middleware import RATE_STATES
from patinox.api._streams import check_stream_level, native_stream, start_streamed
from patinox.control import AgentPatch, AgentSpec, RunRequest
from patinox.errors import InvalidRequest, NotFound
from patinox.limits import RateLimitState, day_start
from patinox.runtime import Runtime
from patinox.storage import AgentRecord, AttemptRecord, RunRecord, TenantStore, utcnow

router = APIRouter(prefix="/v1", tags=["tenant"])

_IDEM = (
    "; with an ``Idempotency-Key``: 400 ``invalid_idempotency_key``, 409 ``idempotency_in_progress``,"
    " 422 ``idempotency_key_reused``"
)
#: The answers ``Idempotency-Key`` adds to a create route.
_IDEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"model": o.ErrorOut, "description": f"``already_exists``{_IDEM}"},
}


def _agent_out(row: AgentRecord) -> o.AgentOut:
    return o.AgentOut.model_validate({**row, "simulated": is_simulated(row["model"])})


def _run_out(row: RunRecord, stored: list[AttemptRecord] | None = None) -> o.RunOut:
    """A run with its attempts: ``stored``, its rows of ``run_attempts`` (a queued run a
    worker executed); without any, a run that started ran once where it was admitted (a
    synchronous run), its one attempt read from the run itself."""
    history = [o.AttemptOut.model_validate(a) for a in stored or ()]
    if not history and row["started_at"] is not None:
        history = [
            o.AttemptOut(
                attempt=1,
                started_at=row["started_at"],
                ended_at=row["finished_at"],
                outcome=_outcome(row),
                input_tokens=row["input_tokens"],
                output_tokens=row["output_tokens"],
                tool_calls=row["tool_calls"],
            )
        ]
    return o.RunOut.model_validate(
        {**row, "simulated": bool(row["simulated"]), "attempts": len(history), "attempt_history": history}
    )


def _outcome(row: RunRecord) -> str | None:
    """How a run's only attempt ended, from the run (``None`` while it runs)."""
    if row["status"] in ("queued", "running"):
        return None
    if row["status"] == "succeeded":
        return "succeeded"
    reason = (row["error"] or {}).get("reason")
    return reason if reason in ("cancelled", "interrupted") else "failed"


#: The run route: every run comes this way, so the app adds it to its own routes, matched
#: first, instead of through this router (FastAPI matches an included router's path once
#: to select it and again to pick its route: two passes over the routes on every request).
RUN_PATH = "/v1/agents/{agent_id}/runs"
RUN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "the finished run; with `mode: stream`, server-sent events `run.started`, "
        "`text.delta`, `tool.call`, `tool.result`, then `run.completed` (the run) or `error`",
    },
    202: {"model": o.RunOut, "description": "the queued run (``async``), with ``Location``"},
    409: {"model": o.ErrorOut, "description": f"``idempotency_in_progress`` or the codes above{_IDEM}"},
    502: {"model": o.ErrorOut},
}


async def create_run(agent_id: str, req: RunRequest, ctx: RunWriter, request: Request) -> Response:
    """Run the agent: ``sync`` answers 200 with the finished run; ``async`` answers 202 at once
    with ``Location`` to poll; ``stream`` answers server-sent events as the run goes, the
    run record last (:func:`patinox.api._streams.native_stream`). A failed sync run answers
    502 ``run_failed`` with its ``run_id``.

    With an ``Idempotency-Key`` header (``sync`` and ``async``), a retry with the same key and
    body answers the first response (``Idempotent-Replayed: true``) and starts no run (see
    the API section of the README)."""
    # The runtime straight from the app, not through the RT dependency: every run comes this
    # way, and each dependency FastAPI solves costs about 10 us a request on this machine.
    rt: Runtime = request.app.state.runtime
    # The run's admission adds the agent's rate-limit policy to the tenant's and the key's
    # in the response's RateLimit headers, on success and on its own 429 alike.
    states: list[RateLimitState] = request.scope["state"][RATE_STATES]
    if req.mode == "stream":
        check_stream_level(ctx)
        sync = req.model_copy(update={"mode": "sync"})
        return native_stream(
            request, await start_streamed(rt, ctx, agent_id, sync, rate_states=states), _run_out
        )

    async def start() -> Created:
        row = await rt.runs.start(ctx, agent_id, req, rate_states=states)
        if req.mode == "async":
            return 202, _run_out(row), {"Location": f"/v1/runs/{row['id']}"}
        return 200, _run_out(row), {}

    return await idempotent(request.scope, lambda: rt.backend.tenant_store(ctx), start)


@router.get("/me")
def me(ctx: Reader) -> o.MeOut:
    return o.MeOut(
        tenant_id=ctx.tenant_id,
        key_id=ctx.principal,
        scopes=sorted(ctx.scopes),
        plan=ctx.plan,
        isolation_level=ctx.isolation_level.value,
        limits=ctx.limits.model_dump(),
    )


@router.post("/agents", status_code=201, response_model=o.AgentOut, responses=_IDEM_RESPONSES)
async def create_agent(spec: AgentSpec, ctx: AgentWriter, rt: RT, request: Request) -> Response:
    """Create an agent (201). Takes an ``Idempotency-Key`` like every create."""

    async def create() -> Created:
        return 201, _agent_out(rt.agents.create(ctx, spec)), {}

    return await idempotent(request.scope, lambda: rt.backend.tenant_store(ctx), create)


@router.get("/agents")
def list_agents(_: Reader, store: Store) -> list[o.AgentOut]:
    return [_agent_out(a) for a in store.list_agents()]


@router.get("/agents/{agent_id}")
def get_agent(agent_id: str, _: Reader, store: Store) -> o.AgentOut:
    return _agent_out(store.get_agent(agent_id))


@router.patch("/agents/{agent_id}")
def update_agent(agent_id: str, patch: AgentPatch, ctx: AgentWriter, rt: RT) -> o.AgentOut:
    return _agent_out(rt.agents.update(ctx, agent_id, patch))


@router.delete("/agents/{agent_id}", status_code=204)
def delete_agent(agent_id: str, ctx: AgentWriter, rt: RT) -> Response:
    rt.agents.delete(ctx, agent_id)
    return Response(status_code=204)


#: Stored input and output bytes one page of ``GET /v1/runs`` may carry (8 MiB).
RUNS_PAGE_BYTES = 8 * 2**20


@router.get("/runs")
def list_runs(
    _: Reader,
    store: Store,
    response: Response,
    agent_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[str | None, Query(max_length=40, description="a run id: runs older than it")] = None,
) -> list[o.RunOut]:
    """Runs, newest first, ``limit`` at most and at most 8 MiB of inputs and outputs a page
    (at least one run). When more may follow, ``Link: <...?before=ID>; rel="next"``."""
    runs = store.list_runs(agent_id=agent_id, limit=limit, before=before, max_bytes=RUNS_PAGE_BYTES)
    more = len(runs) == limit or (bool(runs) and _truncated(store, runs, agent_id))
    if more:
        query = {"limit": limit, "before": runs[-1]["id"], **({"agent_id": agent_id} if agent_id else {})}
        response.headers["Link"] = f'</v1/runs?{urlencode(query)}>; rel="next"'
    attempts = store.list_attempts([x["id"] for x in runs])
    return [_run_out(x, attempts[x["id"]]) for x in runs]


def _truncated(store: TenantStore, runs: list[RunRecord], agent_id: str | None) -> bool:
    """True when a page shorter than its limit was cut by the byte budget (older runs exist)."""
    return bool(store.list_runs(agent_id=agent_id, limit=1, before=runs[-1]["id"]))


@router.post(
    "/runs/{run_id}/cancel",
    response_model=o.RunOut,
    responses={
        202: {"model": o.RunOut, "description": "cancel requested; the process running the run stops it"},
        409: {"model": o.ErrorOut, "description": "``run_finished``: the run had already finished"},
    },
)
async def cancel_run(run_id: str, ctx: RunWriter, rt: RT, response: Response) -> o.RunOut:
    """Cancel a queued or running run, wherever it runs (200 with the cancelled run).

    A queued run leaves the queue, its reservation given back; a running run is stopped and
    charged what it used. When another process runs it and has not stopped it within a
    few seconds, 202 with the run as it is (its status turns ``failed``, reason
    ``cancelled``, within about a second more). A finished run answers 409 ``run_finished``;
    another tenant's run answers 404 like a missing one."""
    row, settled = await rt.runs.cancel(ctx, run_id)
    if not settled:
        response.status_code = 202
    store = rt.backend.tenant_store(ctx)
    return _run_out(row, store.list_attempts([run_id])[run_id])


@router.get("/runs/{run_id}")
def get_run(run_id: str, _: Reader, store: Store) -> o.RunOut:
    """The run, with each of its executions (``attempts``, ``attempt_history``)."""
    return _run_out(store.get_run(run_id), store.list_attempts([run_id])[run_id])


@router.get("/memory")
def list_memory(
    _: Reader, store: Store, prefix: str = "", limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[str]:
    return store.memory_list(prefix, limit)


@router.get("/memory/{key:path}")
def get_memory(key: str, _: Reader, store: Store) -> o.MemoryItemOut:
    value = store.memory_get(key)
    if value is None:
        raise NotFound(f"memory key {key!r} not found")
    return o.MemoryItemOut(key=key, value=value)


@router.put("/memory/{key:path}")
def put_memory(key: str, body: o.MemoryPut, ctx: AgentWriter, store: Store) -> o.MemoryItemOut:
    if not 1 <= len(key) <= 200:
        raise InvalidRequest("memory keys are 1-200 characters", field="key")
    store.memory_put(key, body.value)
    store.append_audit(actor=ctx.principal, action="memory.put", target=key, outcome="ok")
    return o.MemoryItemOut(key=key, value=body.value)


@router.delete("/memory/{key:path}", status_code=204)
def delete_memory(key: str, ctx: AgentWriter, store: Store) -> Response:
    store.memory_delete(key)
    store.append_audit(actor=ctx.principal, action="memory.delete", target=key, outcome="ok")
    return Response(status_code=204)


@router.get("/usage")
def usage(ctx: Reader, rt: RT, store: Store, since: o.Timestamp | None = None) -> o.TenantUsageOut:
    spent, reserved = rt.budget.spent_today(ctx.tenant_id)
    records = store.list_usage(since=since or day_start(utcnow()))
    return o.TenantUsageOut(
        tokens_today=spent,
        tokens_reserved=reserved,
        tokens_per_day=ctx.limits.tokens_per_day,
        runs_in_flight=rt.queue.held(ctx.tenant_id),
        records=[o.UsageRecordOut.model_validate({**u, "simulated": bool(u["simulated"])}) for u in records],
    )


@router.get("/audit")
def audit(
    _: Reader,
    store: Store,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after_seq: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> list[o.AuditOut]:
    return [o.AuditOut(**a) for a in store.list_audit(limit=limit, after_seq=after_seq)]
