"""The tenant execution process: bound to one tenant, confined, then runs agents on request.

Forked by the template (:mod:`patinox.isolation.template`) with one socket, its channel to
the host (:mod:`patinox.isolation.channel`). It holds no database credential, no KEK and
no provider key, and imports only what it runs (agents, tenancy, errors, the channel: an
import-linter contract says so).

Its life:

1. **Bind** (the host's first message, :class:`~patinox.isolation.channel.Bind`): join
   its cgroup (write its own pid into the cgroup files: it is still root right after the
   fork), apply its rlimits, enter the tenant's directory, drop privileges when root
   (``setgroups([])``, ``setresgid``, ``setresuid`` to the tenant's execution identity,
   then ``PR_SET_NO_NEW_PRIVS``; it checks afterwards that it cannot become uid 0 again
   and holds no capability), die with the template (``PR_SET_PDEATHSIG``, set again after
   the change of identity, which clears it). Then :class:`Ready`.
2. **Runs**, one at a time (:class:`Run`): :func:`patinox.agents.run_agent` with a stand-in
   model (:class:`ChannelModel`: each model request goes to the host, which runs the real
   model, simulated or provider, and counts its tokens) and a stand-in memory store
   (:class:`ChannelMemory`: each call is served by the host's store of the tenant the host
   bound this channel to). The agent loop, its tools and its limits run here. Then
   :class:`Done` or :class:`Failed`.

Any message without ``tenant_id``, for another tenant, malformed or out of order is
answered with :class:`Refused`, and the process exits at once. End-of-file on the
channel (the host closed it or died) ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

from pydantic_ai.exceptions import AgentRunError, ModelAPIError, ModelHTTPError, UnexpectedModelBehavior
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RunUsage

from patinox._process import SERVER_GC_THRESHOLDS
from patinox.agents import AgentDefinition, FetchedPage, RunLimits, run_agent
from patinox.errors import PatinoxError, RunFailed
from patinox.isolation.channel import (
    Bind,
    BlockingChannel,
    ChannelClosed,
    Done,
    ErrorData,
    Failed,
    FetchCall,
    FetchReply,
    MemoryCall,
    MemoryReply,
    ModelReply,
    ModelRequest,
    ProtocolError,
    Ready,
    Refused,
    Run,
    decode_host_message,
)
from patinox.isolation.code import CodeRunner
from patinox.tenancy import tenant_scope

__all__ = ["ChannelFetcher", "ChannelMemory", "ChannelModel", "confine", "exception_of", "serve"]

PR_SET_PDEATHSIG: Final = 1
PR_SET_NO_NEW_PRIVS: Final = 38
PR_GET_NO_NEW_PRIVS: Final = 39

#: Exit statuses of an execution process.
EXIT_CLOSED: Final = 0  #: the host closed the channel
EXIT_REFUSED: Final = 3  #: a message was refused
EXIT_CONFINEMENT: Final = 4  #: binding or confinement failed
EXIT_ORPHANED: Final = 5  #: the template was gone before the process could die with it

_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> int:
    """``prctl(option, value, 0, 0, 0)``.

    Raises:
        OSError: the kernel refused (errno set).
    """
    result = int(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent (the template) dies; exit now if it already did."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)


def _effective_capabilities() -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def confine(bind: Bind, *, parent_pid: int) -> None:
    """Apply ``bind`` to this process (see the module docstring, step 1).

    Raises:
        OSError: a step failed (the process must not serve then).
        PermissionError: after dropping privileges it could still become root or still
            holds a capability.
    """
    pid = str(os.getpid())
    for path in bind.cgroup_procs:
        with open(path, "w", encoding="utf-8") as procs:
            procs.write(pid)
    for which, soft, hard in bind.rlimits:
        resource.setrlimit(which, (soft, hard))
    if bind.workdir is not None:
        # Entered while still root: the directories above it need not be searchable by
        # the tenant's uid (a 0700 data directory); the directory itself is its own.
        os.chdir(bind.workdir)
    dropped = os.geteuid() == 0 and bind.uid is not None and bind.gid is not None
    if dropped:
        assert bind.uid is not None and bind.gid is not None
        os.setgroups([])
        os.setresgid(bind.gid, bind.gid, bind.gid)
        os.setresuid(bind.uid, bind.uid, bind.uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    die_with_parent(parent_pid)  # the change of identity cleared it
    if dropped:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PermissionError("the execution process could become root again after dropping privileges")
        if _effective_capabilities() != 0:
            raise PermissionError("the execution process still holds capabilities")


def _exit(status: int) -> NoReturn:
    """End the process now, wherever it is (inside the agent loop too, which would catch an
    exception): a forked execution process has nothing to clean up."""
    os._exit(status)


_T = TypeVar("_T")


class _Connection:
    """The process's side of its channel, bound to one tenant."""

    def __init__(self, channel: BlockingChannel, tenant_id: str) -> None:
        self.channel = channel
        self.tenant_id = tenant_id

    def send(self, message: ModelRequest | MemoryCall | FetchCall | Done | Failed | Ready | Refused) -> None:
        try:
            self.channel.send(message)
        except (ChannelClosed, OSError):
            _exit(EXIT_CLOSED)

    def refuse(self, reason: str) -> NoReturn:
        """Answer :class:`Refused` and end the process."""
        with contextlib.suppress(ChannelClosed, OSError):
            self.channel.send(Refused(reason=reason))
        _exit(EXIT_REFUSED)

    def receive(self) -> Bind | Run | ModelReply | MemoryReply | FetchReply:
        """The host's next message, for this process's tenant (anything else is refused)."""
        try:
            body = self.channel.receive_body()
        except (ChannelClosed, OSError):
            _exit(EXIT_CLOSED)
        except ProtocolError as err:
            self.refuse(str(err))
        try:
            message = decode_host_message(body)
        except ProtocolError as err:
            self.refuse(str(err))
        if message.tenant_id != self.tenant_id:
            self.refuse("a message for another tenant than the one this process is bound to")
        return message

    def call(self, request: ModelRequest | MemoryCall | FetchCall, reply: type[_T]) -> _T:
        """Send ``request`` and return the host's reply, which must be a ``reply``."""
        self.send(request)
        message = self.receive()
        if not isinstance(message, reply):
            self.refuse(f"expected {reply.__name__}, got {message.type}")
        return message


class ChannelModel(Model):
    """The pydantic-ai model of an execution process: every request is made by the host.

    ``request`` sends the request's messages, settings and parameters to the host
    (:class:`~patinox.isolation.channel.ModelRequest`) and returns the host's
    :class:`~pydantic_ai.messages.ModelResponse`; an error the host's model raised is
    raised here again as the same kind (so the run fails as it would in process).
    """

    def __init__(self, connection: _Connection, *, model_name: str, system: str, usage: RunUsage) -> None:
        super().__init__()
        self._connection = connection
        self._model_name = model_name
        self._system = system
        self._usage = usage

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def system(self) -> str:
        return self._system

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        settings: dict[str, Any] | None = dict(model_settings) if model_settings else None
        reply = self._connection.call(
            ModelRequest(
                messages=messages,
                settings=settings,
                parameters=model_request_parameters,
                tool_calls=self._usage.tool_calls,
            ),
            ModelReply,
        )
        if reply.error is not None:
            raise exception_of(reply.error)
        if reply.response is None:
            self._connection.refuse("a model reply with neither a response nor an error")
        return reply.response


class ChannelMemory:
    """The tenant's agent memory as the execution process sees it: each call is served by
    the host, on the store of the tenant the host bound the channel to (a
    :class:`~patinox.agents.MemoryStore`)."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def _call(self, call: MemoryCall) -> MemoryReply:
        reply = self._connection.call(call, MemoryReply)
        if reply.error is not None:
            raise exception_of(reply.error)
        return reply

    def memory_get(self, key: str) -> str | None:
        return self._call(MemoryCall(op="get", key=key)).value

    def memory_put(self, key: str, value: str) -> None:
        self._call(MemoryCall(op="put", key=key, value=value))

    def memory_list(self, prefix: str = "", limit: int = 100) -> list[str]:
        return self._call(MemoryCall(op="list", prefix=prefix, limit=limit)).keys or []


class ChannelFetcher:
    """The ``http_fetch`` tool as the execution process sees it: each fetch is made by the
    host, through its outbound-request guard under the bound tenant's egress policy (a
    :class:`~patinox.agents.HttpFetcher`); the process has no network of its own."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def fetch(self, url: str) -> FetchedPage:
        reply = self._connection.call(FetchCall(url=url), FetchReply)
        if reply.error is not None:
            raise exception_of(reply.error)
        return FetchedPage(
            status=reply.status, content_type=reply.content_type, body=reply.body, url=reply.url
        )


def exception_of(error: ErrorData) -> Exception:
    """The exception the host's error stands for, of the same kind as far as a run's
    outcome can tell: the Patinox error of that code; pydantic-ai's model errors; any other
    as an exception of the same class name (runs name it in their message)."""
    if error.kind == "patinox":
        return error.to_error()
    if error.name == "ModelHTTPError" and isinstance(error.fields.get("status_code"), int):
        return ModelHTTPError(error.fields["status_code"], str(error.fields.get("model_name", "")))
    if error.name == "ModelAPIError":
        return ModelAPIError(str(error.fields.get("model_name", "")), error.message)
    if error.name == "UnexpectedModelBehavior":
        return UnexpectedModelBehavior(error.message)
    if error.kind == "pydantic_ai":
        return AgentRunError(error.message)
    named: type[Exception] = type(error.name, (Exception,), {})
    return named(error.message)


def _failed(err: PatinoxError, usage: RunUsage, started: float) -> Failed:
    extra: dict[str, Any] = {k: err.fields[k] for k in ("tool", "limit") if k in err.fields}
    return Failed(
        code=err.code,
        reason=str(getattr(err, "reason", err.code)) if isinstance(err, RunFailed) else err.code,
        message=err.message,
        fields=extra,
        tool_calls=usage.tool_calls,
        duration_ms=(time.perf_counter() - started) * 1000,
    )


def _run(
    connection: _Connection, loop: asyncio.AbstractEventLoop, run: Run, code: CodeRunner | None = None
) -> Done | Failed:
    usage = RunUsage()
    started = time.perf_counter()
    model = ChannelModel(connection, model_name=run.model_name, system=run.model_system, usage=usage)
    try:
        definition = AgentDefinition(
            name=run.name, instructions=run.instructions, model=run.model, tools=run.tools
        )
        limits = RunLimits(
            max_output_tokens=run.max_output_tokens,
            max_tool_calls=run.max_tool_calls,
            timeout_s=run.timeout_s,
            max_total_tokens=run.max_total_tokens,
        )
        with tenant_scope(run.context):
            outcome = loop.run_until_complete(
                run_agent(
                    definition,
                    run.prompt,
                    output_tokens=run.output_tokens,
                    limits=limits,
                    memory=ChannelMemory(connection),
                    usage=usage,
                    model=model,
                    code=code,
                    fetch=ChannelFetcher(connection),
                )
            )
    except PatinoxError as err:
        return _failed(err, usage, started)
    return Done(output=outcome.output, tool_calls=outcome.tool_calls, duration_ms=outcome.duration_ms)


def serve(fd: int, *, parent_pid: int) -> NoReturn:
    """Serve the channel on ``fd`` until the host closes it, then exit the process.

    The first message must be :class:`Bind`; the process confines itself (:func:`confine`)
    and answers :class:`Ready`, then runs each :class:`Run` to :class:`Done` or
    :class:`Failed`. Exit statuses: :data:`EXIT_CLOSED`, :data:`EXIT_REFUSED`,
    :data:`EXIT_CONFINEMENT` (never returns; ``os._exit``, no cleanup of the template's).
    """
    try:
        channel = BlockingChannel(socket.socket(fileno=fd))
        unbound = _Connection(channel, tenant_id="")
        try:
            bind = decode_host_message(channel.receive_body())
        except (ChannelClosed, OSError):
            _exit(EXIT_CLOSED)
        except ProtocolError as err:
            unbound.refuse(str(err))
        if not isinstance(bind, Bind):
            unbound.refuse(f"the first message must bind the process, not {bind.type}")
        try:
            confine(bind, parent_pid=parent_pid)
        except OSError as err:
            unbound.refuse(f"confinement failed: {err}")
        connection = _Connection(channel, tenant_id=bind.tenant_id)
        # As a server process: the template's heap is frozen, so collections scan only
        # what runs allocate, and rarely (see patinox._process).
        gc.set_threshold(*SERVER_GC_THRESHOLDS)
        connection.send(Ready(pid=os.getpid(), uid=os.getuid(), gid=os.getgid()))
        loop = asyncio.new_event_loop()
        code = None
        if bind.code_timeout_s is not None and bind.code_output_bytes is not None:
            # In the tenant's sandbox: each python call a fresh child, in the tenant's directory.
            code = CodeRunner(
                timeout_s=bind.code_timeout_s, output_bytes=bind.code_output_bytes, cwd=Path(os.getcwd())
            )
        while True:
            message = connection.receive()
            if not isinstance(message, Run):
                connection.refuse(f"expected a run, got {message.type}")
            connection.send(_run(connection, loop, message, code))
    except BaseException as err:  # a bug: say so on stderr, then exit
        try:
            print(f"patinox execution process {os.getpid()}: {type(err).__name__}: {err}", file=sys.stderr)
        finally:
            _exit(EXIT_CONFINEMENT)
