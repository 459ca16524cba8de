"""Conversation threads: runs that continue a thread's conversation.

A thread is a tenant's conversation, stored encrypted (:class:`~patinox.storage.ThreadRecords`).
A run on a thread (:meth:`ThreadService.run`) is a synchronous run of one of the tenant's
agents through :meth:`RunService.start <patinox.control.RunService.start>`, like
``POST /v1/agents/{id}/runs``, with the thread's stored messages passed to the model as
message history (:class:`~patinox.agents.Conversation`): the same admission, audit, usage
record and settlement, and the whole history counts in the run's worst-case token
reservation.

What a run adds: when it succeeds, its input (role ``user``) and the agent's reply (role
``assistant``) are appended to the thread in one transaction, and the oldest messages
beyond the plan's ``max_thread_messages`` are dropped. A run that fails or is cancelled
appends nothing: the thread reads as if it had not been tried, and a retry sends the same
history again.

The history reaches the model at every isolation level: at ``namespace`` the run executes
here; at ``process``, ``container`` and ``dedicated`` the turns travel with the run to the
tenant's execution process (``RunExecutor.execute``'s ``history``), whose model requests
the host serves and counts.

Two runs on one thread at once both see the history as it was when each started, and
each appends its own pair (adjacent, in the order they finish).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from patinox.agents import Conversation
from patinox.control.runs import RunRequest, RunService
from patinox.limits import RateLimitState
from patinox.storage import MessageRecord, RunRecord, SqlBackend, ThreadRecord, Turn
from patinox.tenancy import TenantContext

__all__ = [
    "MAX_METADATA_ENTRIES",
    "ThreadRunRequest",
    "ThreadService",
    "ThreadSpec",
]

#: Most entries a thread's metadata may hold.
MAX_METADATA_ENTRIES = 16

_MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
_MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class ThreadSpec(BaseModel):
    """A thread as a tenant creates it.

    ``metadata``: at most 16 entries, keys 1-64 characters, values at most 512 characters
    (stored sealed, returned as given).
    """

    model_config = ConfigDict(extra="forbid")

    metadata: dict[_MetadataKey, _MetadataValue] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_ENTRIES,
        description="a small string map of the caller's (at most 16 entries; keys 1-64, values "
        "at most 512 characters)",
    )


class ThreadRunRequest(BaseModel):
    """A run on a thread: which agent, the user's next message, and the reply's length."""

    model_config = ConfigDict(extra="forbid")

    agent_id: str = Field(min_length=1, max_length=40, description="one of the tenant's agents")
    input: str = Field(min_length=1, max_length=1_000_000, description="the user's next message")
    output_tokens: int | None = Field(
        default=None, ge=1, strict=True, description="output tokens to ask the model for (simulated: exact)"
    )


class ThreadService:
    """Threads of the tenant in the context given, and runs on them.

    Args:
        backend: the deployment's storage.
        runs: the run path (admission, execution, settlement).
    """

    def __init__(self, backend: SqlBackend, runs: RunService) -> None:
        self._backend = backend
        self._runs = runs

    def create(self, ctx: TenantContext, spec: ThreadSpec) -> ThreadRecord:
        """A new empty thread of ``ctx``'s tenant; audited (``thread.create``).

        Raises:
            QuotaExceeded: the tenant already holds its plan's ``max_threads`` threads.
            TenantKeysDestroyed: the tenant was crypto-shredded.
        """
        store = self._backend.tenant_store(ctx)
        thread = store.threads().create(spec.metadata, limit=ctx.limits.max_threads)
        store.append_audit(actor=ctx.principal, action="thread.create", target=thread["id"], outcome="ok")
        return thread

    def delete(self, ctx: TenantContext, thread_id: str) -> int:
        """Delete the thread and its messages; audited (``thread.delete``, with how many
        messages went). Returns that number.

        Raises:
            NotFound: no such thread of this tenant (another tenant's alike).
        """
        store = self._backend.tenant_store(ctx)
        gone = store.threads().delete(thread_id)
        store.append_audit(
            actor=ctx.principal,
            action="thread.delete",
            target=thread_id,
            outcome="ok",
            detail={"messages": gone},
        )
        return gone

    async def run(
        self,
        ctx: TenantContext,
        thread_id: str,
        req: ThreadRunRequest,
        *,
        rate_states: list[RateLimitState] | None = None,
    ) -> tuple[RunRecord, list[MessageRecord]]:
        """Run the agent on the thread: its stored messages are the model's message history,
        and on success the input and the reply are appended (see the module docstring).

        Returns:
            ``(run, messages)``: the finished run and the two messages appended.

        Raises:
            NotFound: no such thread (or agent) of this tenant; the thread deleted while
                the run ran (the run is recorded, nothing is appended).
            InvalidRequest: ``output_tokens`` above the agent's or plan's cap; the
                tenant's isolation level cannot take message history.
            RateLimited, ConcurrencyLimited, QuotaExceeded, Overloaded, ExceedsBudget,
                TenantSuspended: admission refused (see :meth:`RunService.start`); nothing
                was run or appended.
            RunFailed: the run failed or was cancelled; nothing was appended.
        """
        threads = self._backend.tenant_store(ctx).threads()
        history = threads.history(thread_id)
        turns_so_far: list[tuple[Literal["user", "assistant"], str]] = [
            ("assistant" if m["role"] == "assistant" else "user", m["content"]) for m in history
        ]
        # Always a conversation, an empty one too: a thread's first run goes the way of
        # every later one (the same isolation levels take it).
        conversation = Conversation(history=tuple(turns_so_far))
        run_req = RunRequest(input=req.input, output_tokens=req.output_tokens, mode="sync")
        row = await self._runs.start(
            ctx, req.agent_id, run_req, rate_states=rate_states, conversation=conversation
        )
        turns: list[Turn] = [
            {"role": "user", "content": req.input},
            {"role": "assistant", "content": row["output"] or ""},
        ]
        appended = threads.append(thread_id, turns, keep=ctx.limits.max_thread_messages, run_id=row["id"])
        return row, appended
