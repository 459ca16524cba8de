"""The offline simulated model: a deterministic stand-in for an LLM, labelled as simulated.

It is a :class:`pydantic_ai.models.function.FunctionModel` driven by :class:`SimulatedLLM`, so a
run against it goes through exactly the same pydantic-ai agent loop (tools, usage limits,
retries) as a run against a real provider. Nothing leaves the process.

Model ids (the ``simulated`` family; see :func:`parse_simulated_model_id`)::

    simulated                          default latency (DEFAULT_LATENCY: 50 ms TTFT, 2 ms/token)
    simulated:instant                  no latency at all
    simulated:ttft_ms=20,tpot_ms=1     explicit latency; either parameter may be left out and
                                       then takes its value from DEFAULT_LATENCY

Tokenizer:
    A token is a whitespace-separated word (``len(text.split())``, see
    :func:`count_simulated_tokens`). Input tokens of one model request are the words of the
    instructions and system prompts, of every user prompt, of every tool return (and tool
    retry/failure feedback) and of every previous model response in the messages sent with
    that request. A previous tool call counts as the words of ``"<tool_name> <json args>"``.
    Non-text user content (images, files) counts as zero tokens.

Output:
    The final text reply has exactly the requested number of output tokens: the run's
    ``max_tokens`` model setting (the run's requested ``output_tokens``) or, when none is
    set, :data:`DEFAULT_OUTPUT_TOKENS` (16). The reply starts with the word ``[simulated]``
    (which counts as one of the tokens), then the tool results of the run, if any, as text
    (``"<tool_name> = <result>"`` or ``"<tool_name> failed: <error>"``), then words from a
    fixed vocabulary; the whole is truncated to the requested count.

Tool calls:
    The model calls tools only when the run's user prompt (the last one sent; a
    conversation's earlier turns had their calls in their own runs) contains lines of the form
    ``/call <tool_name> <json-object-args>``, for example
    ``/call calculator {"expression": "2*(3+4)"}``. It issues them in prompt order, ONE tool
    call per model response, so every call sees the effects of the previous one (a
    ``memory_put`` followed by a ``memory_get`` of the same key reads the value back). When
    pydantic-ai asks for a call to be retried (unknown tool, invalid arguments) the model
    issues the same call again, so pydantic-ai's retry budget ends such a run with
    :class:`~pydantic_ai.exceptions.UnexpectedModelBehavior`. A tool-call response has
    ``count_simulated_tokens(f"{tool_name} {json_args}")`` output tokens. A malformed
    ``/call`` line (arguments not a JSON object, or holding lone surrogates that UTF-8
    cannot encode) also raises ``UnexpectedModelBehavior``.

Latency:
    Every model response (tool call or final reply) waits, with :func:`asyncio.sleep`::

        delay_s = ttft_s + tpot_s * output_tokens_of_that_response

    ``ttft_s`` is the time to first token and ``tpot_s`` the time per output token, both in
    seconds. Input tokens do not add latency.

Streaming:
    A streamed request (pydantic-ai's ``request_stream``, used by runs that stream their
    events) answers the same response with the same usage, delivered at the same pace: the
    first word after ``ttft_s + tpot_s``, then one word every ``tpot_s``; a tool call arrives
    whole once its ``ttft_s + tpot_s * n`` has passed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponsePart,
    ModelResponseStreamEvent,
    RetryFeedbackPart,
    SystemPromptPart,
    TextContent,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import CompletedStreamedResponse, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import RequestUsage

from patinox.errors import UnknownModel

__all__ = [
    "DEFAULT_LATENCY",
    "DEFAULT_OUTPUT_TOKENS",
    "SIMULATED_MARKER",
    "SimulatedLLM",
    "SimulatedLatency",
    "SimulatedModel",
    "count_simulated_tokens",
    "is_simulated",
    "parse_simulated_model_id",
    "set_default_latency",
    "simulated_model",
]

SIMULATED_FAMILY: Final = "simulated"
SIMULATED_MARKER: Final = "[simulated]"
"""First word of every final reply of the simulated model (it counts as one output token)."""
DEFAULT_OUTPUT_TOKENS: Final = 16
"""Words in a final reply when the run requests no output token count."""
CALL_PREFIX: Final = "/call"

_VOCABULARY: Final = (
    "this", "reply", "was", "generated", "offline", "by", "the", "patinox", "simulated",
    "model", "and", "no", "real", "language", "model", "was", "called", "for", "it",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SimulatedLatency:
    """Latency of the simulated model.

    Attributes:
        ttft_s: time to first token of every model response, seconds (>= 0).
        tpot_s: time per output token, seconds (>= 0).
    """

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 seconds, got {value!r}")

    def delay_s(self, output_tokens: int) -> float:
        """Seconds one response with ``output_tokens`` tokens waits: ``ttft_s + tpot_s * n``."""
        return self.ttft_s + self.tpot_s * output_tokens


DEFAULT_LATENCY: SimulatedLatency = SimulatedLatency(ttft_s=0.05, tpot_s=0.002)
"""Latency of the plain ``simulated`` model id and of parameters left out of an explicit one.

Read each time a model id is parsed; change it with :func:`set_default_latency` (rebinding
the name imported elsewhere would not reach this module).
"""

INSTANT_LATENCY: Final = SimulatedLatency(ttft_s=0.0, tpot_s=0.0)


def set_default_latency(latency: SimulatedLatency) -> SimulatedLatency:
    """Rebind :data:`DEFAULT_LATENCY` (deployment configuration); runs started later use it.

    Returns:
        The previous default, so a caller (or a test) can restore it.
    """
    global DEFAULT_LATENCY
    previous, DEFAULT_LATENCY = DEFAULT_LATENCY, latency
    return previous


_PARAMS: Final = {"ttft_ms": "ttft_s", "tpot_ms": "tpot_s"}
#: A parameter's value: a plain decimal number of milliseconds, matched whole (no sign,
#: exponent, "_", whitespace or newline, all of which ``float`` would take).
_MILLISECONDS: Final = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def is_simulated(model_id: str) -> bool:
    """Whether ``model_id`` names the simulated family (``simulated`` or ``simulated:...``).

    Only the family is checked; :func:`parse_simulated_model_id` validates the parameters.
    """
    return model_id == SIMULATED_FAMILY or model_id.startswith(SIMULATED_FAMILY + ":")


def parse_simulated_model_id(model_id: str) -> SimulatedLatency:
    """The latency a simulated model id asks for.

    Grammar: ``simulated`` | ``simulated:instant`` |
    ``simulated:<param>=<number>[,<param>=<number>]`` with params ``ttft_ms`` and ``tpot_ms``
    (milliseconds as plain decimal digits, e.g. ``20`` or ``0.5``, each at most once; a
    missing one takes its :data:`DEFAULT_LATENCY` value). Nothing else, not even
    whitespace, may stand in the id.

    Returns:
        The latency (in seconds) of the model.

    Raises:
        UnknownModel: not a simulated id, or bad parameters (the message says which and why).
    """
    if not is_simulated(model_id):
        raise UnknownModel(f"{model_id!r} is not a simulated model id", model=model_id)
    spec = model_id[len(SIMULATED_FAMILY) + 1 :] if model_id != SIMULATED_FAMILY else None
    if spec is None:
        return DEFAULT_LATENCY
    if spec == "instant":
        return INSTANT_LATENCY
    values: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, raw = item.partition("=")
        if not sep or name not in _PARAMS:
            raise UnknownModel(
                f"bad simulated model id {model_id!r}: {item!r} is not one of "
                "'ttft_ms=<number>', 'tpot_ms=<number>' (use e.g. "
                "'simulated:ttft_ms=20,tpot_ms=1' or 'simulated:instant')",
                model=model_id,
            )
        if _PARAMS[name] in values:
            raise UnknownModel(f"bad simulated model id {model_id!r}: {name} given twice", model=model_id)
        if _MILLISECONDS.fullmatch(raw) is None:
            raise UnknownModel(
                f"bad simulated model id {model_id!r}: {name} must be a number of "
                f"milliseconds >= 0 in decimal digits, got {raw!r}",
                model=model_id,
            )
        values[_PARAMS[name]] = float(raw) / 1000.0
    base = DEFAULT_LATENCY
    return SimulatedLatency(
        ttft_s=values.get("ttft_s", base.ttft_s), tpot_s=values.get("tpot_s", base.tpot_s)
    )


def simulated_model(model_id: str = SIMULATED_FAMILY) -> SimulatedModel:
    """A pydantic-ai model for a simulated model id; its ``model_name`` is ``model_id``.

    Cheap (a few microseconds): built per run, so a rebinding of :data:`DEFAULT_LATENCY`
    takes effect on the next run.

    Raises:
        UnknownModel: bad model id (see :func:`parse_simulated_model_id`).
    """
    return SimulatedModel(parse_simulated_model_id(model_id), model_name=model_id)


class SimulatedModel(FunctionModel):
    """The simulated model: a :class:`FunctionModel` of :class:`SimulatedLLM` that also streams.

    A plain request waits ``latency.delay_s(n)`` and answers at once (unchanged). A
    streamed request computes the same response without waiting, then delivers it at
    the stated pace (module docstring, "Streaming"), with the same exact usage.

    Args:
        latency: how long each model response takes.
        model_name: the model id.
    """

    def __init__(self, latency: SimulatedLatency, *, model_name: str) -> None:
        super().__init__(SimulatedLLM(latency), model_name=model_name)
        self.latency = latency
        self._unpaced = FunctionModel(SimulatedLLM(INSTANT_LATENCY), model_name=model_name)

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        response = await self._unpaced.request(messages, model_settings, model_request_parameters)
        response.model_name = self.model_name
        yield _PacedStream(response, model_request_parameters=model_request_parameters, latency=self.latency)


class _PacedStream(CompletedStreamedResponse):
    """A computed response delivered word by word at the simulated pace; its ``get()`` is
    the response, and its ``usage`` the response's once delivered whole, so a streamed run
    records what a plain one does. A stream stopped early (its run cancelled) used the
    output tokens it delivered so far."""

    def __init__(
        self,
        response: ModelResponse,
        *,
        model_request_parameters: ModelRequestParameters,
        latency: SimulatedLatency,
    ) -> None:
        super().__init__(response, model_request_parameters=model_request_parameters, replay_events=True)
        self._latency = latency
        self._delivered = 0
        self._seen: tuple[int, RequestUsage, ModelResponse] | None = None

    @property
    def usage(self) -> RequestUsage:
        return self._partial()[0]

    def get(self) -> ModelResponse:
        return self._partial()[1]

    def _partial(self) -> tuple[RequestUsage, ModelResponse]:
        """The usage and response as delivered so far (pydantic-ai reads them after every
        event: built once per delivered count)."""
        if self._seen is None or self._seen[0] != self._delivered:
            response = super().get()
            full = response.usage
            if self._delivered < full.output_tokens:  # stopped early, or not done yet
                full = dataclasses.replace(full, output_tokens=self._delivered)
                response = dataclasses.replace(response, usage=full)
            self._seen = (self._delivered, full, response)
        return self._seen[1], self._seen[2]

    async def _get_event_iterator(self) -> AsyncIterator[ModelResponseStreamEvent]:
        ttft, tpot = self._latency.ttft_s, self._latency.tpot_s
        if ttft > 0:
            await asyncio.sleep(ttft)
        for index, part in enumerate(self.response.parts):
            if isinstance(part, TextPart):
                for n, word in enumerate(part.content.split(" ")):
                    if tpot > 0:
                        await asyncio.sleep(tpot)
                    chunk = word if n == 0 else " " + word
                    self._delivered += 1 if word else 0
                    for event in self._parts_manager.handle_text_delta(vendor_part_id=index, content=chunk):
                        yield event
                continue
            tokens = _response_part_tokens(part)
            if tpot * tokens > 0:
                await asyncio.sleep(tpot * tokens)
            self._delivered += tokens
            yield self._parts_manager.handle_part(vendor_part_id=index, part=part)
        self._delivered = self.response.usage.output_tokens


def count_simulated_tokens(text: str) -> int:
    """Tokens of ``text`` for the simulated model: its whitespace-separated words."""
    return len(text.split())


@dataclass(frozen=True, kw_only=True)
class _PlannedCall:
    tool_name: str
    args: dict[str, Any]


class SimulatedLLM:
    """The function behind the simulated :class:`FunctionModel` (see the module docstring).

    Args:
        latency: how long each model response takes.
    """

    def __init__(self, latency: SimulatedLatency) -> None:
        self.latency = latency

    async def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        """Answer one model request.

        Returns:
            A response with one part (a tool call or the final text) and its exact usage.

        Raises:
            UnexpectedModelBehavior: malformed ``/call`` line or invalid ``max_tokens``.
        """
        # Tool calls and their results are this run's: those planned in its own prompt.
        # Earlier turns of a conversation (message history) had theirs in their own runs.
        turn = _current_turn(messages)
        calls = _planned_calls(turn)
        done = _completed_calls(turn)
        part: ModelResponsePart
        if done < len(calls):
            call = calls[done]
            part = ToolCallPart(call.tool_name, call.args)
        else:
            part = TextPart(_final_text(turn, _requested_tokens(info)))
        output_tokens = _response_part_tokens(part)
        usage = RequestUsage(input_tokens=_input_tokens(messages, info), output_tokens=output_tokens)
        delay = self.latency.delay_s(output_tokens)
        if delay > 0:
            await asyncio.sleep(delay)
        return ModelResponse(parts=[part], usage=usage)


def _requested_tokens(info: AgentInfo) -> int:
    requested = (info.model_settings or {}).get("max_tokens")
    if requested is None:
        return DEFAULT_OUTPUT_TOKENS
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise UnexpectedModelBehavior(
            f"simulated model: max_tokens must be a positive integer, got {requested!r}"
        )
    return requested


def _current_turn(messages: Sequence[ModelMessage]) -> Sequence[ModelMessage]:
    """The messages from the last request holding a user prompt on: this run's prompt and
    what followed it (tool calls and results), without the conversation's earlier turns."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if isinstance(message, ModelRequest) and any(isinstance(p, UserPromptPart) for p in message.parts):
            return messages[i:]
    return messages


def _user_prompt_texts(messages: Sequence[ModelMessage]) -> Iterator[str]:
    for message in messages:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, UserPromptPart):
                    yield from _texts(part.content)


def _texts(content: str | Sequence[Any]) -> Iterator[str]:
    if isinstance(content, str):
        yield content
        return
    for item in content:
        if isinstance(item, str):
            yield item
        elif isinstance(item, TextContent):
            yield item.content


def _planned_calls(messages: Sequence[ModelMessage]) -> list[_PlannedCall]:
    calls: list[_PlannedCall] = []
    for text in _user_prompt_texts(messages):
        for line in text.splitlines():
            words = line.strip().split(maxsplit=2)
            if not words or words[0] != CALL_PREFIX:
                continue
            calls.append(_parse_call(line.strip(), words))
    return calls


def _parse_call(line: str, words: list[str]) -> _PlannedCall:
    if len(words) < 2:
        raise UnexpectedModelBehavior(
            f'simulated model: {line!r} names no tool; expected "/call <tool_name> <json-object-args>"'
        )
    try:
        args = json.loads(words[2]) if len(words) > 2 else {}
    except json.JSONDecodeError as exc:
        raise UnexpectedModelBehavior(
            f"simulated model: the arguments of {line!r} are not valid JSON ({exc.msg})"
        ) from exc
    if not isinstance(args, dict):
        raise UnexpectedModelBehavior(f"simulated model: the arguments of {line!r} must be a JSON object")
    try:
        # JSON escapes can spell lone surrogates ("\\ud800"), which no UTF-8 text holds: the
        # tool call could not be serialised, sent or stored, so the line is malformed.
        json.dumps(args, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnexpectedModelBehavior(
            f"simulated model: the arguments of {line!r} hold characters UTF-8 cannot encode"
        ) from exc
    return _PlannedCall(tool_name=words[1], args=args)


def _completed_calls(messages: Sequence[ModelMessage]) -> int:
    """Tool calls that got a final answer; a call answered with 'retried' is still pending."""
    return sum(
        1
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart) and part.outcome != "retried"
    )


def _tool_results(messages: Sequence[ModelMessage]) -> Iterator[str]:
    for message in messages:
        if not isinstance(message, ModelRequest):
            continue
        for part in message.parts:
            if not isinstance(part, ToolReturnPart) or part.outcome == "retried":
                continue
            if part.outcome == "success":
                yield f"{part.tool_name} = {part.model_response_str()}"
            else:
                yield f"{part.tool_name} {part.outcome}: {part.content}"


def _final_text(messages: Sequence[ModelMessage], tokens: int) -> str:
    words = itertools.chain(
        [SIMULATED_MARKER],
        (word for result in _tool_results(messages) for word in result.split()),
        itertools.cycle(_VOCABULARY),
    )
    return " ".join(itertools.islice(words, tokens))


def _response_part_tokens(part: object) -> int:
    if isinstance(part, TextPart):
        return count_simulated_tokens(part.content)
    if isinstance(part, ToolCallPart):
        return count_simulated_tokens(f"{part.tool_name} {part.args_as_json_str()}")
    return 0


def _request_part_tokens(part: object) -> int:
    if isinstance(part, SystemPromptPart):
        return count_simulated_tokens(part.content)
    if isinstance(part, UserPromptPart):
        return sum(count_simulated_tokens(text) for text in _texts(part.content))
    if isinstance(part, ToolReturnPart):
        return count_simulated_tokens(part.model_response_str())
    if isinstance(part, RetryFeedbackPart):
        return count_simulated_tokens(part.model_response())
    return 0


def _input_tokens(messages: Sequence[ModelMessage], info: AgentInfo) -> int:
    tokens = count_simulated_tokens(info.instructions or "")
    for message in messages:
        if isinstance(message, ModelRequest):
            tokens += sum(_request_part_tokens(part) for part in message.parts)
        else:
            tokens += sum(_response_part_tokens(part) for part in message.parts)
    return tokens
