"""The run loop: one agent run through pydantic-ai, with limits, and errors translated.

:func:`run_agent` builds a pydantic-ai :class:`~pydantic_ai.Agent` per run from the agent
definition (instructions, model, only the definition's tools) and runs it with the run's
:class:`~patinox.agents.tools.ToolDeps` (the tenant-bound memory store). Building the Agent
costs tens of microseconds because the tools are prebuilt at import (see
:mod:`patinox.agents.tools`); the pydantic-ai agent loop itself costs on the order of a
millisecond per run.

Every failure inside the run ends as :class:`~patinox.errors.RunFailed` with the original
exception chained and these fields:

``reason`` (stable, short)
    ``timeout`` (``limits.timeout_s`` passed), ``tool_call_limit`` (the model asked for more
    than ``limits.max_tool_calls`` tool calls), ``request_limit`` (more model requests than
    :func:`request_limit_for` allows), ``usage_limit`` (another pydantic-ai usage limit),
    ``tool_error`` (a tool raised; field ``tool`` names it), ``disk_limit`` (a ``python``
    call left the tenant's writable directory full; field ``tool``), ``provider_error`` (the model
    provider's API failed), ``model_error`` (the model misbehaved: unknown tool, invalid
    arguments past the retry budget, malformed output), ``internal_error`` (anything else).
``model``, ``simulated``
    The model id of the run, and whether it is the simulated model.
``input_tokens``, ``output_tokens``, ``requests``, ``tool_calls``
    Usage so far, best effort: the model responses and successful tool calls completed
    before the failure (a model response still in flight is not counted). Callers settle
    quota reservations with it.
``duration_ms``
    Wall time of the run until the failure, milliseconds.

Misuse by the caller (bad ``output_tokens``, unknown model, unknown tool) raises
:class:`~patinox.errors.InvalidRequest`, :class:`~patinox.errors.UnknownModel` or
:class:`~patinox.errors.UnknownTool` before anything runs.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from pydantic_ai import Agent, RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.capabilities.abstract import AgentNode, NodeResult
from pydantic_ai.exceptions import (
    AgentRunError,
    ModelAPIError,
    UsageLimitExceeded,
)
from pydantic_ai.messages import (
    AgentStreamEvent,
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    SystemPromptPart,
    TextPart,
    TextPartDelta,
    UserPromptPart,
)
from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RunUsage, UsageLimits

from patinox.agents.models import resolve_model
from patinox.agents.simulated import is_simulated
from patinox.agents.tools import (
    CodeRunner,
    HttpFetcher,
    MemoryStore,
    ToolDeps,
    ToolExecutionError,
    ToolLimitReached,
    builtin_tools,
)
from patinox.errors import InvalidRequest, PatinoxError, RunFailed

__all__ = [
    "MIN_REQUEST_LIMIT",
    "AgentDefinition",
    "Conversation",
    "RunEvent",
    "RunLimits",
    "RunOutcome",
    "request_limit_for",
    "run_agent",
]

MIN_REQUEST_LIMIT: Final = 50
"""Fewest model requests a run may make (pydantic-ai's own default guard against loops)."""


@dataclass(frozen=True, kw_only=True)
class AgentDefinition:
    """What an agent is: a tenant's named instructions, model and tools.

    Attributes:
        name: the agent's name within its tenant.
        instructions: the system instructions sent with every model request.
        model: a model id (see :mod:`patinox.agents.models`).
        tools: built-in tool names the agent may call (see :mod:`patinox.agents.tools`).
        provider_key: the tenant's own key for the model's provider (BYOK), read on the
            host for this run; ``None``: the deployment's shared key. Used where the model
            is resolved (always the host), never sent to an execution process, never shown
            in a repr.
    """

    name: str
    instructions: str
    model: str
    tools: tuple[str, ...] = ()
    provider_key: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class RunLimits:
    """Limits of one run, usually the tenant's effective limits.

    Attributes:
        max_output_tokens: most output tokens a run may request (>= 1); also passed as
            ``max_tokens`` to provider models when the run requests no count.
        max_tool_calls: most successful tool calls in one run (>= 0).
        timeout_s: wall time of the run, seconds (> 0).
        max_total_tokens: most tokens (input + output, summed over every model request of
            the run) the run may use; ``None`` for no cap. pydantic-ai checks it after each
            model response, so a run stops at most one response past it.

    Raises:
        InvalidRequest: a limit out of range (field ``field``).
    """

    max_output_tokens: int
    max_tool_calls: int
    timeout_s: float
    max_total_tokens: int | None = None

    def __post_init__(self) -> None:
        if _not_int(self.max_output_tokens) or self.max_output_tokens < 1:
            raise InvalidRequest("max_output_tokens must be an integer >= 1", field="max_output_tokens")
        if _not_int(self.max_tool_calls) or self.max_tool_calls < 0:
            raise InvalidRequest("max_tool_calls must be an integer >= 0", field="max_tool_calls")
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise InvalidRequest("timeout_s must be a finite number > 0 seconds", field="timeout_s")


@dataclass(frozen=True, kw_only=True)
class RunOutcome:
    """The result of a successful run.

    Attributes:
        output: the model's final text reply.
        model: the model id that produced it.
        simulated: whether that model is the offline simulated model.
        input_tokens: input tokens over all model requests of the run.
        output_tokens: output tokens over all model responses (tool calls included).
        tool_calls: successful tool calls.
        requests: model requests.
        duration_ms: wall time of the run, milliseconds.
        cpu_seconds: CPU time the run's execution process used, seconds; ``None`` where
            the run shares a process (``namespace``) and nothing measures it alone.
        peak_memory_bytes: peak memory of the run's execution process, bytes; ``None`` as
            for ``cpu_seconds``.
    """

    output: str
    model: str
    simulated: bool
    input_tokens: int
    output_tokens: int
    tool_calls: int
    requests: int
    duration_ms: float
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None


class _AfterEachStep(AbstractCapability[ToolDeps]):
    """Calls ``on_usage(usage)`` after each step of the agent loop: a model response
    (already counted in ``usage``, before any tool it asks for runs), or the tool calls a
    response asked for. An exception it raises ends the run (``internal_error``)."""

    def __init__(self, usage: RunUsage, on_usage: Callable[[RunUsage], None]) -> None:
        self._usage = usage
        self._on_usage = on_usage

    async def after_node_run(
        self, ctx: RunContext[ToolDeps], *, node: AgentNode[ToolDeps], result: NodeResult[ToolDeps]
    ) -> NodeResult[ToolDeps]:
        self._on_usage(self._usage)
        return result


@dataclass(frozen=True, kw_only=True)
class RunEvent:
    """One thing a streamed run did, as it happened.

    Attributes:
        kind: ``started`` (the run was admitted and recorded as ``run_id``; sent by the
            run service before the agent loop begins),
            ``text`` (a piece of a model's text reply, in ``text``), ``tool_call`` (the
            model asked for ``tool_name`` with ``args``, a JSON object as text, under
            ``tool_call_id``) or ``tool_result`` (the tool answered ``result``, text, with
            ``outcome`` ``success``, ``failed`` or ``denied``; ``retry`` when the model was
            asked to try again).
    """

    kind: Literal["started", "text", "tool_call", "tool_result"]
    text: str = ""
    tool_name: str = ""
    tool_call_id: str = ""
    args: str = ""
    result: str = ""
    outcome: str = ""
    run_id: str = ""


#: A role of a conversation turn: the roles of the chat-completions protocol Patinox keeps.
Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, kw_only=True)
class Conversation:
    """What a run gets beyond its prompt: earlier turns, and where its events go.

    Attributes:
        history: earlier turns, oldest first, as ``(role, text)``: ``system`` turns follow
            the agent's own instructions (they never replace them), ``user`` and
            ``assistant`` turns are passed to the model as message history.
        on_event: called on the event loop with each :class:`RunEvent` as it happens (the
            run streams its model responses); ``None``: the run does not stream.
    """

    history: tuple[tuple[Role, str], ...] = ()
    on_event: Callable[[RunEvent], None] | None = None

    def text(self) -> str:
        """Every turn's text, joined by newlines (what a token estimate counts)."""
        return "\n".join(text for _, text in self.history)

    def messages(self) -> list[ModelMessage]:
        """The history as pydantic-ai messages."""
        out: list[ModelMessage] = []
        for role, text in self.history:
            if role == "assistant":
                out.append(ModelResponse(parts=[TextPart(text)]))
            elif role == "system":
                out.append(ModelRequest(parts=[SystemPromptPart(text)]))
            else:
                out.append(ModelRequest(parts=[UserPromptPart(text)]))
        return out


def _event_forwarder(
    on_event: Callable[[RunEvent], None],
) -> Callable[[RunContext[ToolDeps], AsyncIterable[AgentStreamEvent]], Any]:
    """A pydantic-ai ``event_stream_handler`` that hands each text delta, tool call and
    tool result to ``on_event`` as a :class:`RunEvent`."""

    async def forward(_: RunContext[ToolDeps], events: AsyncIterable[AgentStreamEvent]) -> None:
        async for event in events:
            if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                if event.part.content:
                    on_event(RunEvent(kind="text", text=event.part.content))
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                if event.delta.content_delta:
                    on_event(RunEvent(kind="text", text=event.delta.content_delta))
            elif isinstance(event, FunctionToolCallEvent):
                part = event.part
                on_event(
                    RunEvent(
                        kind="tool_call",
                        tool_name=part.tool_name,
                        tool_call_id=part.tool_call_id,
                        args=part.args_as_json_str(),
                    )
                )
            elif isinstance(event, FunctionToolResultEvent):
                result = event.part
                outcome = (
                    getattr(result, "outcome", "success") if result.part_kind == "tool-return" else "retry"
                )
                on_event(
                    RunEvent(
                        kind="tool_result",
                        tool_name=result.tool_name or "",
                        tool_call_id=result.tool_call_id,
                        result=result.model_response_str() if result.part_kind == "tool-return" else "",
                        outcome=str(outcome),
                    )
                )

    return forward


def request_limit_for(limits: RunLimits) -> int:
    """Most model requests a run under ``limits`` may make: ``max(50, max_tool_calls + 1)``."""
    return max(MIN_REQUEST_LIMIT, limits.max_tool_calls + 1)


async def run_agent(
    definition: AgentDefinition,
    prompt: str,
    *,
    output_tokens: int | None,
    limits: RunLimits,
    memory: MemoryStore,
    usage: RunUsage | None = None,
    on_usage: Callable[[RunUsage], None] | None = None,
    code: CodeRunner | None = None,
    model: Model | None = None,
    conversation: Conversation | None = None,
    fetch: HttpFetcher | None = None,
) -> RunOutcome:
    """Run ``definition`` on ``prompt`` once.

    Args:
        definition: the agent to run.
        prompt: the user prompt.
        output_tokens: requested length of the reply in tokens (1..``limits.max_output_tokens``),
            passed to the model as ``max_tokens``; the simulated model answers with exactly
            this many, a provider model with at most this many. ``None``: the simulated
            model's default (16), or at most ``limits.max_output_tokens`` for a provider.
        limits: the run's limits; tool calls are limited through pydantic-ai
            ``UsageLimits``, wall time through :func:`asyncio.timeout`.
        memory: the tenant-bound memory store the memory tools use.
        usage: the counter the run adds its usage to as it goes (pydantic-ai's
            :class:`~pydantic_ai.usage.RunUsage`: tokens and tool calls of the model
            responses and tool calls completed so far); a fresh one when ``None``. Give one
            to read the usage of a run that was cancelled, which raises
            :class:`asyncio.CancelledError` and carries no usage of its own.
        on_usage: called with ``usage`` after each step of the agent loop: after each
            model response (counted in it, before any tool the response asks for runs) and
            after the tool calls a response asked for. Synchronous, on the event loop: the
            run goes on once it returns, so a caller that records usage there has recorded
            every model response but the one in hand. An exception it raises ends the run
            (``RunFailed``, ``reason="internal_error"``).
        code: the runner of the ``python`` tool (the tenant's sandbox, at ``container``
            level and above); ``None``: a ``python`` call ends the run (``tool_error``).
        model: the model to send the requests to instead of ``definition.model`` resolved
            here (an execution process's stand-in, which asks the host to run the real
            one); ``definition.model`` still names the run's model in its outcome.
        conversation: earlier turns passed as message history, and the callback of a
            streamed run (see :class:`Conversation`); ``None``: the prompt alone, not streamed.
        fetch: the ``http_fetch`` tool's requests, bound to the tenant's egress policy on
            the host; ``None``: no egress (each call is a failed tool result).

    Returns:
        The reply with its usage and duration.

    Raises:
        InvalidRequest: ``output_tokens`` out of range (field ``field="output_tokens"``).
        UnknownModel: the definition's model id is unknown or not configured.
        UnknownTool: the definition lists an unknown or duplicate tool.
        RunFailed: the run failed; ``reason`` and usage so far as fields (module docstring).
    """
    _check_output_tokens(output_tokens, limits)
    if model is None:
        model = resolve_model(definition.model, api_key=definition.provider_key)
    simulated = is_simulated(definition.model)
    started = time.perf_counter()
    usage = RunUsage() if usage is None else usage
    agent: Agent[ToolDeps, str] = Agent(
        model,
        deps_type=ToolDeps,
        instructions=definition.instructions,
        tools=builtin_tools(definition.tools),
        name=definition.name,
        capabilities=[_AfterEachStep(usage, on_usage)] if on_usage is not None else None,
    )
    settings: ModelSettings = {}
    if output_tokens is not None:
        settings["max_tokens"] = output_tokens
    elif not simulated:
        settings["max_tokens"] = limits.max_output_tokens
    usage_limits = UsageLimits(
        tool_calls_limit=limits.max_tool_calls,
        request_limit=request_limit_for(limits),
        total_tokens_limit=limits.max_total_tokens,
    )
    deadline = asyncio.timeout(limits.timeout_s)
    extra: dict[str, Any] = {}
    if conversation is not None:
        if conversation.history:
            extra["message_history"] = conversation.messages()
        if conversation.on_event is not None:
            extra["event_stream_handler"] = _event_forwarder(conversation.on_event)
    try:
        async with deadline:
            result = await agent.run(
                prompt,
                deps=ToolDeps(memory=memory, code=code, fetch=fetch),
                model_settings=settings,
                usage_limits=usage_limits,
                usage=usage,
                infer_name=False,
                **extra,
            )
    except Exception as exc:
        timed_out = deadline.expired() and isinstance(exc, TimeoutError)
        failure, cause = _run_failed(
            exc,
            timed_out=timed_out,
            model=definition.model,
            usage=usage,
            started=started,
            limits=limits,
        )
        raise failure from cause
    return RunOutcome(
        output=result.output,
        model=definition.model,
        simulated=simulated,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        tool_calls=usage.tool_calls,
        requests=usage.requests,
        duration_ms=_elapsed_ms(started),
    )


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _check_output_tokens(output_tokens: int | None, limits: RunLimits) -> None:
    if output_tokens is None:
        return
    if _not_int(output_tokens) or not 1 <= output_tokens <= limits.max_output_tokens:
        raise InvalidRequest(
            f"output_tokens must be an integer from 1 to {limits.max_output_tokens}, got {output_tokens!r}",
            field="output_tokens",
            limit=limits.max_output_tokens,
        )


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


_E = TypeVar("_E", bound=BaseException)


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    """``exc`` itself, or the first ``kind`` inside it if it is an exception group."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _find(inner, kind)) is not None:
                return found
    return None


def _classify(exc: Exception, limits: RunLimits) -> tuple[str, str, dict[str, Any]]:
    """``(reason, message, extra fields)`` of a failure other than a timeout or a tool error.

    Messages name the failure, never internal details of a provider or of the host.
    """
    if isinstance(exc, UsageLimitExceeded):
        # pydantic-ai tells its limits apart only in the message; tests pin these words.
        if "tool_calls_limit" in exc.message:
            return (
                "tool_call_limit",
                f"the run asked for more than {limits.max_tool_calls} tool calls",
                {"limit": limits.max_tool_calls},
            )
        if "request_limit" in exc.message:
            limit = request_limit_for(limits)
            return (
                "request_limit",
                f"the run made more than {limit} model requests",
                {"limit": limit},
            )
        return "usage_limit", f"a usage limit was exceeded: {exc.message}", {}
    if isinstance(exc, ModelAPIError):
        return "provider_error", f"the model provider failed: {type(exc).__name__}", {}
    if isinstance(exc, AgentRunError):
        return "model_error", f"the model failed: {exc.message}", {}
    return "internal_error", f"the run failed: {type(exc).__name__}", {}


def _run_failed(
    exc: Exception,
    *,
    timed_out: bool,
    model: str,
    usage: RunUsage,
    started: float,
    limits: RunLimits,
) -> tuple[RunFailed, BaseException]:
    """The RunFailed for ``exc``, and the exception to chain to it.

    A tool error chains the tool's own exception; anything else chains ``exc``.
    """
    cause: BaseException = exc
    extra: dict[str, Any]
    if timed_out:
        reason, message, extra = (
            "timeout",
            f"the run exceeded its timeout of {limits.timeout_s} s",
            {},
        )
    elif (tool_exc := _find(exc, ToolExecutionError)) is not None:
        original = tool_exc.__cause__ or tool_exc
        detail = original.message if isinstance(original, PatinoxError) else type(original).__name__
        reason, message, extra = (
            "tool_error",
            f"tool {tool_exc.tool_name!r} failed: {detail}",
            {"tool": tool_exc.tool_name},
        )
        if isinstance(original, ToolLimitReached):
            reason, message = original.reason, f"tool {tool_exc.tool_name!r}: {original}"
        cause = original
    else:
        reason, message, extra = _classify(exc, limits)
    failure = RunFailed(
        message,
        reason=reason,
        model=model,
        simulated=is_simulated(model),
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        tool_calls=usage.tool_calls,
        requests=usage.requests,
        duration_ms=_elapsed_ms(started),
        **extra,
    )
    return failure, cause
