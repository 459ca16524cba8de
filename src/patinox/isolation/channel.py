"""The channel between the host and one execution process, and between the host and the
template that forks them: typed messages and their framing.

Every message is a pydantic model with a ``type`` tag; a frame is a 4-byte big-endian
length followed by that many bytes of the message's JSON, at most :data:`MAX_FRAME_BYTES`.

One execution process, one Unix stream socket. The host binds the process to ONE tenant
with the first message it sends (:class:`Bind`); the process never chooses it. Every later
host→process message carries ``tenant_id``; the process answers a message without one, or
for another tenant, with :class:`Refused` and exits.

Host → process: :class:`Bind`, :class:`Run`, :class:`ModelReply`, :class:`MemoryReply`,
:class:`FetchReply`.
Process → host: :class:`Ready`, :class:`ModelRequest` (the host runs the real model and
counts its tokens), :class:`MemoryCall` (served by the host's store of the tenant the host
bound the channel to: nothing in the message names a tenant), :class:`Done`,
:class:`Failed`, :class:`Refused`, :class:`FetchCall` (the ``http_fetch`` tool's request,
made by the host through its outbound-request guard under the bound tenant's egress policy:
the process itself has no network).

Host ↔ template (a Unix seqpacket socket, one frame a packet): :class:`Spawn` (with the new
process's socket passed as ``SCM_RIGHTS``) and :class:`Kill`; :class:`TemplateReady`,
:class:`Spawned` and :class:`Exited`.

Two endpoints: :class:`BlockingChannel` (the execution process and the template: one
thing at a time) and :class:`HostChannel` (the host's asyncio side). The host side binds to
no event loop: each call uses the running loop, so a channel outlives the loop that made it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import ModelRequestParameters

from patinox import errors
from patinox.tenancy import TenantContext

__all__ = [
    "MAX_FRAME_BYTES",
    "Bind",
    "BlockingChannel",
    "ChannelClosed",
    "Done",
    "ErrorData",
    "Exited",
    "Failed",
    "FetchCall",
    "FetchReply",
    "HostChannel",
    "HostMessage",
    "Kill",
    "MemoryCall",
    "MemoryReply",
    "ModelReply",
    "ModelRequest",
    "ProcessMessage",
    "ProtocolError",
    "Ready",
    "Refused",
    "Run",
    "Spawn",
    "Spawned",
    "TemplateMessage",
    "TemplateReady",
    "decode_host_message",
    "decode_process_message",
    "decode_template_message",
    "encode",
]

MAX_FRAME_BYTES: Final = 64 * 2**20
"""Largest frame either side accepts, bytes of JSON (a run's messages with large memory
values fit; a peer sending more is a protocol error)."""

_HEADER: Final = struct.Struct(">I")
_READ_CHUNK: Final = 64 * 1024  # below malloc's mmap threshold: no mmap per read


class ChannelClosed(Exception):
    """The other end closed the channel (the process or template exited)."""


class ProtocolError(Exception):
    """The other end sent something that is not a valid frame or message."""


class _Message(BaseModel):
    # Bytes in model messages (binary content) travel as base64, as pydantic-ai's own
    # ModelMessagesTypeAdapter sends them.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")


class ErrorData(_Message):
    """An exception as data, to raise again on the other side as the same kind.

    Attributes:
        kind: ``patinox`` (a :class:`~patinox.errors.PatinoxError`, rebuilt by ``code``),
            ``pydantic_ai`` (one of its errors, by class ``name``) or ``other``.
        name: the exception's class name.
        code: the Patinox error code (``patinox`` only).
        message: its message.
        fields: its structured fields (JSON values only).
    """

    kind: Literal["patinox", "pydantic_ai", "other"]
    name: str
    code: str = ""
    message: str
    fields: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, err: BaseException) -> ErrorData:
        """The data of ``err`` (fields that are not JSON values are dropped)."""
        name = type(err).__name__
        if isinstance(err, errors.PatinoxError):
            return cls(
                kind="patinox", name=name, code=err.code, message=err.message, fields=_plain(err.fields)
            )
        if type(err).__module__.startswith("pydantic_ai"):
            message = str(getattr(err, "message", "") or err)
            return cls(kind="pydantic_ai", name=name, message=message, fields=_plain(vars(err)))
        return cls(kind="other", name=name, message=str(err))

    def to_error(self) -> errors.PatinoxError:
        """A ``patinox`` error again, as the class of the tree with this ``code`` (the root
        when none has it)."""
        kind = errors.class_for_code(self.code) or errors.PatinoxError
        return kind(self.message, **self.fields)


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if isinstance(v, str | int | float | bool | None)}


# --- host → execution process ----------------------------------------------------------


class Bind(_Message):
    """The first message on a new process's channel: what the process is, for good.

    Attributes:
        tenant_id: the one tenant this process serves.
        uid, gid: the identity it drops to when started as root (``None``: keep its own).
        workdir: the directory it works in (the tenant's writable directory); ``None``: stay.
        rlimits: ``(resource.RLIMIT_*, soft, hard)`` it applies to itself before dropping
            privileges.
        cgroup_procs: cgroup files (``cgroup.procs``/``tasks``) it writes its own pid into
            while still root, to join its cgroup.
        code_timeout_s, code_output_bytes: the ``python`` tool's bounds per call (seconds,
            bytes); ``None``: no ``python`` tool (below the ``container`` level).
    """

    type: Literal["bind"] = "bind"
    tenant_id: str = Field(min_length=1)
    uid: int | None = None
    gid: int | None = None
    workdir: str | None = None
    rlimits: list[tuple[int, int, int]] = Field(default_factory=list)
    cgroup_procs: list[str] = Field(default_factory=list)
    code_timeout_s: float | None = Field(default=None, gt=0)
    code_output_bytes: int | None = Field(default=None, ge=1)


class Run(_Message):
    """Run one agent for the bound tenant (see :func:`patinox.agents.run_agent`).

    Attributes:
        tenant_id: must equal the bound tenant's.
        context: the tenant context of the run, entered as the process's tenant scope.
        name, instructions, model, tools: the agent definition.
        model_name, model_system: the host's model's name and system (the process's stand-in
            model answers with them).
        prompt, output_tokens: as :func:`~patinox.agents.run_agent`.
        max_output_tokens, max_tool_calls, timeout_s, max_total_tokens: the run's limits.
    """

    type: Literal["run"] = "run"
    tenant_id: str = Field(min_length=1)
    context: TenantContext
    name: str
    instructions: str
    model: str
    tools: tuple[str, ...] = ()
    model_name: str
    model_system: str
    prompt: str
    output_tokens: int | None
    max_output_tokens: int
    max_tool_calls: int
    timeout_s: float
    max_total_tokens: int | None = None


class ModelReply(_Message):
    """The host's answer to a :class:`ModelRequest`: the model's response, or its error."""

    type: Literal["model_reply"] = "model_reply"
    tenant_id: str = Field(min_length=1)
    response: ModelResponse | None = None
    error: ErrorData | None = None


class MemoryReply(_Message):
    """The host's answer to a :class:`MemoryCall`: a value (``get``), keys (``list``), or an
    error (``InvalidRequest`` for a key the store refuses, ``StorageError``...)."""

    type: Literal["memory_reply"] = "memory_reply"
    tenant_id: str = Field(min_length=1)
    value: str | None = None
    keys: list[str] | None = None
    error: ErrorData | None = None


class FetchReply(_Message):
    """The host's answer to a :class:`FetchCall`: the page (``status``, ``content_type``,
    ``body`` as text, the ``url`` that answered), or the error (``EgressRefused``,
    ``OutboundFailed``)."""

    type: Literal["fetch_reply"] = "fetch_reply"
    tenant_id: str = Field(min_length=1)
    status: int = 0
    content_type: str = ""
    body: str = ""
    url: str = ""
    error: ErrorData | None = None


HostMessage = Annotated[Bind | Run | ModelReply | MemoryReply | FetchReply, Field(discriminator="type")]
"""What the host sends an execution process."""


# --- execution process → host ----------------------------------------------------------


class Ready(_Message):
    """The process is bound, confined and waits for runs."""

    type: Literal["ready"] = "ready"
    pid: int
    uid: int
    gid: int


class ModelRequest(_Message):
    """Ask the host to make a model request (pydantic-ai's :meth:`Model.request` arguments).

    Attributes:
        messages: the conversation so far.
        settings: the model settings of the request (the host sets ``max_tokens`` itself).
        parameters: the request parameters (function tools, output mode...).
        tool_calls: successful tool calls of the run so far (the host counts tokens itself).
    """

    type: Literal["model_request"] = "model_request"
    messages: list[ModelMessage]
    settings: dict[str, Any] | None = None
    parameters: ModelRequestParameters
    tool_calls: int = 0


class MemoryCall(_Message):
    """A memory tool's call of the tenant's store: ``get(key)``, ``put(key, value)`` or
    ``list(prefix, limit)``."""

    type: Literal["memory_call"] = "memory_call"
    op: Literal["get", "put", "list"]
    key: str = ""
    value: str = ""
    prefix: str = ""
    limit: int = 100


class FetchCall(_Message):
    """The ``http_fetch`` tool's ``GET url``, made by the host (nothing in it names a
    tenant or a policy: the host uses the bound tenant's)."""

    type: Literal["fetch_call"] = "fetch_call"
    url: str = Field(max_length=8192)


class Done(_Message):
    """The run finished: the model's final reply (tokens are the host's count)."""

    type: Literal["done"] = "done"
    output: str
    tool_calls: int
    duration_ms: float


class Failed(_Message):
    """The run failed inside the process (a :class:`~patinox.errors.RunFailed` or a refusal
    before it started): ``code``, ``reason``, ``message`` and extra fields (``tool``, ``limit``)."""

    type: Literal["failed"] = "failed"
    code: str
    reason: str
    message: str
    fields: dict[str, Any] = Field(default_factory=dict)
    tool_calls: int = 0
    duration_ms: float = 0.0


class Refused(_Message):
    """The process refused a message (no ``tenant_id``, another tenant's, out of order, or
    malformed) and exits."""

    type: Literal["refused"] = "refused"
    reason: str


ProcessMessage = Annotated[
    Ready | ModelRequest | MemoryCall | Done | Failed | Refused | FetchCall, Field(discriminator="type")
]
"""What an execution process sends the host."""


# --- host ↔ template -----------------------------------------------------------------------


class Spawn(_Message):
    """Fork one execution process on the socket passed with this message (``SCM_RIGHTS``)."""

    type: Literal["spawn"] = "spawn"
    seq: int


class Kill(_Message):
    """SIGKILL the template's child ``pid`` (ignored unless it is a live child of it)."""

    type: Literal["kill"] = "kill"
    pid: int


class TemplateReady(_Message):
    """The template imported the agent stack and forks on request."""

    type: Literal["template_ready"] = "template_ready"
    pid: int


class Spawned(_Message):
    """The answer to :class:`Spawn` ``seq``: the child's ``pid``, or why none was forked."""

    type: Literal["spawned"] = "spawned"
    seq: int
    pid: int | None = None
    error: str | None = None


class Exited(_Message):
    """A child of the template ended: ``status`` as :attr:`subprocess.Popen.returncode`
    (the exit code, or ``-signal`` when a signal killed it)."""

    type: Literal["exited"] = "exited"
    pid: int
    status: int


TemplateMessage = Annotated[Spawn | Kill | TemplateReady | Spawned | Exited, Field(discriminator="type")]
"""What the host and the template send each other."""

_M = TypeVar("_M")

_HOST: Final[TypeAdapter[Bind | Run | ModelReply | MemoryReply | FetchReply]] = TypeAdapter(HostMessage)
_PROCESS: Final[TypeAdapter[Ready | ModelRequest | MemoryCall | Done | Failed | Refused | FetchCall]] = (
    TypeAdapter(ProcessMessage)
)
_TEMPLATE: Final[TypeAdapter[Spawn | Kill | TemplateReady | Spawned | Exited]] = TypeAdapter(TemplateMessage)


def encode(message: _Message) -> bytes:
    """One frame: the 4-byte big-endian length, then ``message`` as JSON.

    Raises:
        ProtocolError: the JSON is longer than :data:`MAX_FRAME_BYTES`.
    """
    body = message.__pydantic_serializer__.to_json(message)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(
            f"a {type(message).__name__} message of {len(body)} bytes is over {MAX_FRAME_BYTES}"
        )
    return _HEADER.pack(len(body)) + body


def decode_host_message(body: bytes) -> Bind | Run | ModelReply | MemoryReply | FetchReply:
    """A host→process message from a frame's body.

    Raises:
        ProtocolError: not one of them (malformed, unknown type, a field missing such as
            ``tenant_id``); the validation error is chained.
    """
    return _decoded(_HOST, body)


def decode_process_message(
    body: bytes,
) -> Ready | ModelRequest | MemoryCall | Done | Failed | Refused | FetchCall:
    """A process→host message from a frame's body. Raises :class:`ProtocolError`."""
    return _decoded(_PROCESS, body)


def decode_template_message(body: bytes) -> Spawn | Kill | TemplateReady | Spawned | Exited:
    """A host↔template message from a frame's body. Raises :class:`ProtocolError`."""
    return _decoded(_TEMPLATE, body)


def _decoded(adapter: TypeAdapter[_M], body: bytes) -> _M:
    try:
        return adapter.validate_json(body)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False)[:5]
        )
        raise ProtocolError(f"not a valid message: {problems}") from err


def _length(header: bytes | bytearray | memoryview) -> int:
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {size} bytes is over {MAX_FRAME_BYTES}")
    return int(size)


class _Frames:
    """Frames cut out of a byte stream as it arrives."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> bytes | None:
        """The next complete frame's body, or ``None`` until more bytes arrive."""
        buf = self._buf
        if len(buf) < _HEADER.size:
            return None
        size = _length(buf[: _HEADER.size])
        end = _HEADER.size + size
        if len(buf) < end:
            return None
        body = bytes(buf[_HEADER.size : end])
        del buf[:end]
        return body


class BlockingChannel:
    """A channel endpoint doing one thing at a time with a blocking socket (the execution
    process's side; the host's while it binds a new process).

    Args:
        sock: a connected Unix stream socket, blocking (a timeout, if set, applies to each
            read and write).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._frames = _Frames()

    def send(self, message: _Message) -> None:
        """Send one message.

        Raises:
            ChannelClosed: the other end is gone.
        """
        try:
            self.sock.sendall(encode(message))
        except (BrokenPipeError, ConnectionResetError) as err:
            raise ChannelClosed("the other end closed the channel") from err

    def receive_body(self) -> bytes:
        """The next frame's body (JSON bytes).

        Raises:
            ChannelClosed: the other end closed the channel.
            ProtocolError: a frame over :data:`MAX_FRAME_BYTES`.
            TimeoutError: the socket's timeout passed.
        """
        while (body := self._frames.next()) is None:
            try:
                data = self.sock.recv(_READ_CHUNK)
            except ConnectionResetError as err:
                raise ChannelClosed("the other end reset the channel") from err
            if not data:
                raise ChannelClosed("the other end closed the channel")
            self._frames.feed(data)
        return body


class HostChannel:
    """The host's asyncio endpoint of one execution process's channel.

    The socket is non-blocking; each call waits on the running event loop, so the channel
    can be used from one loop after another (a test's ``asyncio.run`` calls, a server's
    loop). One reader and one writer at a time.
    """

    __slots__ = ("_frames", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._frames = _Frames()

    async def send(self, message: _Message) -> None:
        """Send one message.

        Raises:
            ChannelClosed: the process is gone.
        """
        data = encode(message)
        try:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                await asyncio.get_running_loop().sock_sendall(self.sock, memoryview(data)[sent:])
        except OSError as err:  # a broken pipe, a reset, or the host's end already closed
            raise ChannelClosed("the execution process closed its channel") from err

    async def receive(self) -> Ready | ModelRequest | MemoryCall | Done | Failed | Refused | FetchCall:
        """The next message from the process.

        Raises:
            ChannelClosed: the process closed its channel (it exited or was killed).
            ProtocolError: a malformed frame or message.
        """
        frames = self._frames
        while (body := frames.next()) is None:
            try:
                try:
                    data = self.sock.recv(_READ_CHUNK)
                except BlockingIOError:
                    data = await asyncio.get_running_loop().sock_recv(self.sock, _READ_CHUNK)
            except OSError as err:  # a reset, or the host's end already closed
                raise ChannelClosed("the execution process's channel failed") from err
            if not data:
                raise ChannelClosed("the execution process closed its channel")
            frames.feed(data)
        return decode_process_message(body)

    def close(self) -> None:
        """Close the host's end (the process reads end-of-file and exits)."""
        self.sock.close()
