"""The OpenAI chat-completions protocol: request and response bodies, server-sent events,
and the error shape of the OpenAI-compatible routes.

Only the routes of :data:`OPENAI_PATHS` answer errors in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``; the native routes keep Patinox's
``{"error": {"code", "message", "details"}}``. :class:`OpenAIErrorShape` rewrites every
error these routes answer (the tenancy layer's refusals before routing included) from the
one shape to the other, so admission, limits and their headers stay the native route's own.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patinox.agents.runner import Role
from patinox.errors import InvalidRequest, UnsupportedParameter

#: Paths whose errors take OpenAI's shape (``/v1/models/{id}`` too, by prefix).
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")

#: OpenAI's error ``type`` of each status; 429s are told apart by their code.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
}


def openai_error(status: int, native: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI error body of a native one (``{"code", "message", "details"}``).

    ``param`` is the native ``details.field`` when there is one; ``code`` stays the native
    stable code (``quota_exceeded`` answers type ``insufficient_quota``).
    """
    code = native.get("code")
    details = native.get("details") or {}
    field = details.get("field") if isinstance(details, dict) else None
    if code == "quota_exceeded":
        kind = "insufficient_quota"
    elif status == 429:
        kind = "rate_limit_error"
    else:
        kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "error": {
            "message": str(native.get("message", "")),
            "type": kind,
            "param": field if isinstance(field, str) else None,
            "code": code,
        }
    }


class OpenAIErrorShape:
    """ASGI layer: on :data:`OPENAI_PATHS`, a JSON error response (status >= 400) is answered
    in OpenAI's shape; a spent quota's 429 also carries ``x-should-retry: false`` (the
    ``openai`` SDK retries every other 429, honouring ``Retry-After``). Other paths and
    successful responses (streams included) pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(OPENAI_PATHS):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def sending(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await _send_translated(send, start, b"".join(chunks))

        await self.app(scope, receive, sending)


async def _send_translated(send: Send, start: Message, body: bytes) -> None:
    status: int = start["status"]
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    try:
        native = json.loads(body)["error"]
        if not isinstance(native, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        native = {"code": f"http_{status}", "message": body.decode("utf-8", "replace")}
    if native.get("code") == "quota_exceeded":
        headers.append((b"x-should-retry", b"false"))
    payload = json.dumps(openai_error(status, native), separators=(",", ":")).encode()
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class OpenAIError(BaseModel):
    message: str
    type: str = Field(
        description="`invalid_request_error`, `authentication_error`, `permission_error`, "
        "`rate_limit_error`, `insufficient_quota` or `server_error`"
    )
    param: str | None = Field(description="the request parameter at fault, when one is")
    code: str | None = Field(description="Patinox's stable error code (see the native routes)")


class OpenAIErrorOut(BaseModel):
    """An error of the OpenAI-compatible routes."""

    error: OpenAIError


#: Error responses of the OpenAI-compatible routes, as the OpenAPI document lists them.
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorOut, "description": description}
    for status, description in (
        (400, "`unsupported_parameter` (naming `param`) or `malformed_json`"),
        (401, "`unauthenticated`"),
        (403, "`forbidden`, `tenant_suspended` or `model_not_allowed` (the agent's model is not allowed)"),
        (404, "`not_found`: no agent of this tenant has that name or id"),
        (413, "`payload_too_large`"),
        (422, "`invalid_request`, `unknown_model` or `exceeds_budget`"),
        (
            429,
            "`rate_limited` or `concurrency_limited` (with `Retry-After`), `quota_exceeded` "
            "(with `Retry-After` and `x-should-retry: false`)",
        ),
        (502, "`run_failed`"),
        (503, "`storage_error`, `limit_store_unavailable`, `tenant_moving` or `overloaded`"),
    )
}


# --- request ---------------------------------------------------------------------------


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are supported."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: ``model`` names one of the tenant's agents (name or
    id). Parameters the runtime cannot honour are refused (:meth:`refuse_unsupported`);
    sampling hints it has no use for (``temperature``, ``top_p``, ``user``, ``seed``,
    ``metadata``, ``store``...) are accepted and have no effect."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    n: int | None = Field(default=None, ge=1, strict=True)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    stop: str | list[str] | None = None

    def refuse_unsupported(self) -> None:
        """Raise for the first parameter the runtime cannot honour.

        Raises:
            UnsupportedParameter: ``n`` > 1; client ``tools``, ``tool_choice``,
                ``functions`` or ``function_call`` (an agent's tools are its own);
                ``response_format`` other than ``text``; ``logprobs``; ``stop``;
                ``stream_options`` without ``stream: true`` (field ``field``).
        """
        refused: list[tuple[str, bool, str]] = [
            ("n", (self.n or 1) > 1, "one choice per request (n must be 1)"),
            (
                "tools",
                bool(self.tools),
                "an agent calls its own tools; client-supplied tools are not supported",
            ),
            (
                "tool_choice",
                self.tool_choice not in (None, "none", "auto"),
                "client tool choice is not supported",
            ),
            ("functions", bool(self.functions), "client-supplied functions are not supported"),
            (
                "function_call",
                self.function_call not in (None, "none", "auto"),
                "function_call is not supported",
            ),
            (
                "response_format",
                self.response_format is not None and self.response_format.get("type") != "text",
                "only response_format {'type': 'text'} can be enforced",
            ),
            ("logprobs", bool(self.logprobs), "log probabilities are not available"),
            ("stop", bool(self.stop), "stop sequences are not supported"),
            (
                "stream_options",
                self.stream_options is not None and not self.stream,
                "stream_options needs stream: true",
            ),
        ]
        for param, bad, why in refused:
            if bad:
                raise UnsupportedParameter(f"unsupported parameter {param!r}: {why}", field=param)

    def output_tokens(self) -> int | None:
        """The run's output tokens: ``max_completion_tokens``, else ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> tuple[str, tuple[tuple[Role, str], ...]]:
        """``(prompt, history)``: the last message (a ``user`` one) as the run's input, the
        others as ``(role, text)`` turns; ``developer`` counts as ``system``.

        Raises:
            InvalidRequest: the last message is not a user message with text (field
                ``messages``).
            UnsupportedParameter: a ``tool``/``function`` message, an assistant message
                with ``tool_calls``, or non-text content (field ``messages``).
        """
        turns: list[tuple[Role, str]] = []
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function") or m.tool_calls:
                raise UnsupportedParameter(
                    f"messages[{i}]: client tool messages and tool calls are not supported", field="messages"
                )
            role: Role = "system" if m.role in ("system", "developer") else m.role  # type: ignore[assignment]
            turns.append((role, _text(m.content, i)))
        role, prompt = turns[-1]
        if role != "user" or not prompt:
            raise InvalidRequest("the last message must be a user message with text", field="messages")
        return prompt, tuple(turns[:-1])


def _text(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts: list[str] = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise UnsupportedParameter(
                f"messages[{index}]: content of type {part.type!r} is not supported (text only)",
                field="messages",
            )
        texts.append(part.text)
    return "\n".join(texts)


# --- responses ---------------------------------------------------------------------------


def usage_body(input_tokens: int, output_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def completion_body(
    *, run_id: str, model: str, created: int, output: str, usage: dict[str, int]
) -> dict[str, Any]:
    """A ``chat.completion``: one choice, ``finish_reason`` ``stop``."""
    return {
        "id": f"chatcmpl-{run_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": output, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
        "system_fingerprint": None,
    }


class ChunkWriter:
    """The server-sent events of one streamed completion (``chat.completion.chunk``).

    Args:
        completion_id: the ``id`` every chunk carries.
        model: the ``model`` every chunk carries.
        include_usage: ``stream_options.include_usage``: every chunk carries ``usage:
            null`` and :meth:`usage` adds the final usage chunk.
    """

    def __init__(self, *, completion_id: str, model: str, include_usage: bool) -> None:
        self._head: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        self._include_usage = include_usage

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body = {**self._head, "choices": choices}
        if self._include_usage:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def role(self) -> bytes:
        """The first chunk: the assistant role, empty content."""
        return self._choice({"role": "assistant", "content": ""}, None)

    def content(self, text: str) -> bytes:
        """A content delta."""
        return self._choice({"content": text}, None)

    def finish(self, reason: str = "stop") -> bytes:
        """The one chunk with a ``finish_reason``."""
        return self._choice({}, reason)

    def usage(self, usage: dict[str, int]) -> bytes:
        """The usage chunk (``choices: []``); empty when ``include_usage`` is off."""
        return self._event([], usage) if self._include_usage else b""

    def _choice(self, delta: dict[str, Any], reason: str | None) -> bytes:
        return self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}])

    @staticmethod
    def error(status: int, native: dict[str, Any]) -> bytes:
        """An error after the stream began, as the ``openai`` SDK reads one."""
        return b"data: " + json.dumps(openai_error(status, native), separators=(",", ":")).encode() + b"\n\n"

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"
