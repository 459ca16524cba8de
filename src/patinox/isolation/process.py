"""The ``process`` executor: the host side of a run in one of the tenant's execution processes.

:class:`ProcessExecutor` borrows a warm process from the tenant's pool
(:mod:`patinox.isolation.pool`, owned by :mod:`patinox.isolation.supervisor`), sends it
the run, and serves what the process asks for while the agent loop runs there:

- a **model request**: the host resolves the real model (:func:`patinox.agents.resolve_model`:
  simulated, or a provider whose key only the host holds), makes the request, adds the
  response's usage to the run's usage and calls ``on_usage`` exactly as an in-process run
  does, then sends the response back. Token counting stays here, so a compromised process
  cannot change what its tenant is charged; the host also refuses requests past the run's
  request and token limits, and sets ``max_tokens`` itself.
- a **memory call**: served by the memory store the host was given for the run, which is
  bound to the tenant; nothing the process sends names a tenant.
- a **fetch** (the ``http_fetch`` tool): made here through the outbound-request guard
  (:class:`~patinox.isolation.egress.GuardedFetcher`) under the run's tenant's egress
  allow-list and the operator's :class:`~patinox.network.EgressSettings`; the process
  itself keeps no network.

The host enforces the run's wall time (the process is killed at ``timeout_s``: ``timeout``)
and its CPU time (the process's CPU seconds polled while it runs, killed past
``cpu_seconds_per_run``: ``cpu_limit``); a process that dies otherwise fails its run with
``memory_limit`` when the tenant's cgroup counted an OOM kill meanwhile, ``disk_limit``
when the tenant's directory is full, else ``worker_crashed``. Every such failure fails
that run only, with its tokens so far (settled by the caller); the pool replaces the
process. A cancelled run (``asyncio.CancelledError``) kills its process too.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from pydantic_ai.models import Model
from pydantic_ai.usage import RunUsage

from patinox.agents import (
    AgentDefinition,
    MemoryStore,
    RunLimits,
    RunOutcome,
    resolve_model,
    validate_tool_names,
)
from patinox.agents.runner import request_limit_for
from patinox.agents.simulated import is_simulated
from patinox.errors import (
    EgressRefused,
    InvalidRequest,
    IsolationUnavailable,
    PatinoxError,
    RunFailed,
    TenantContextAlreadySet,
)
from patinox.isolation.channel import (
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
    Refused,
    Run,
)
from patinox.isolation.cores import CoreAllocator
from patinox.isolation.egress import GuardedFetcher
from patinox.isolation.execution import ExecutionProcess
from patinox.isolation.pool import EXECUTION_LEVELS, PoolStopped, SpawnFailed, TenantPool
from patinox.isolation.supervisor import PoolSupervisor
from patinox.network import EgressSettings
from patinox.tenancy import IsolationLevel, ResourceLimits, TenantContext, current_tenant_or_none

__all__ = ["ProcessExecutor"]

#: Reasons an execution process may give for its run's failure; anything else is
#: reported as ``internal_error``.
_REASONS: Final = frozenset(
    {
        "timeout",
        "tool_call_limit",
        "request_limit",
        "usage_limit",
        "tool_error",
        "provider_error",
        "model_error",
        "internal_error",
        "disk_limit",
    }
)
#: Seconds to wait for a dead process's exit status, to name it in the run's error.
_EXIT_WAIT_S: Final = 2.0
#: Processes a run is offered before it fails ``worker_crashed`` when each died before it
#: said a word of the run (an idle process killed from outside, not yet reaped).
_OFFERS: Final = 3


class _NotTaken(Exception):
    """The process died before it answered the run: nothing of the run happened in it."""


class ProcessExecutor:
    """Runs each agent in one of its tenant's warm execution processes: the executor of the
    ``process``, ``container`` and ``dedicated`` levels (the pool of a tenant at the two
    latter forks from a template of its own, in the tenant's sandbox, and a ``dedicated``
    tenant's cgroup holds cores of its own).

    Args:
        supervisor: the host's pool supervisor, or a function making it at first use (a
            process that never runs such a tenant never starts one).
        tenant_level: a tenant's isolation level (``None``: gone), for tenant events.
        cores: the cores ``dedicated`` tenants reserve (:meth:`prepare`); the supervisor's
            should be the same allocator.
        egress: the operator's egress settings for the ``http_fetch`` tool (defaults:
            ``https`` to public addresses only, on each tenant's allow-list).
    """

    def __init__(
        self,
        supervisor: PoolSupervisor | Callable[[], PoolSupervisor],
        *,
        tenant_level: Callable[[str], IsolationLevel | None] | None = None,
        cores: CoreAllocator | None = None,
        egress: EgressSettings | None = None,
    ) -> None:
        self.cores = cores
        self.egress = egress or EgressSettings()
        self._supervisor: PoolSupervisor | None = (
            supervisor if isinstance(supervisor, PoolSupervisor) else None
        )
        self._make = None if isinstance(supervisor, PoolSupervisor) else supervisor
        self._tenant_level = tenant_level
        self._lock = threading.Lock()
        #: Whether this process executes runs (a server with a worker, ``patinox worker``):
        #: then a ``process`` tenant created here gets its pool at once.
        self.hosts_pools = False

    @property
    def supervisor(self) -> PoolSupervisor:
        """The pool supervisor, made at first use."""
        if self._supervisor is None:
            with self._lock:
                if self._supervisor is None:
                    assert self._make is not None
                    self._supervisor = self._make()
        return self._supervisor

    @property
    def started(self) -> bool:
        """Whether the supervisor exists (a ``process``-level run or pool was needed)."""
        return self._supervisor is not None

    def prepare(self, tenant_id: str, level: IsolationLevel, limits: ResourceLimits) -> None:
        """Reserve what a tenant at ``level`` needs before it exists (or moves there): a
        ``dedicated`` tenant's ``limits.dedicated_cores`` cores. Idempotent.

        Raises:
            IsolationUnavailable: not enough cores are free (the error says how many are).
        """
        if level is not IsolationLevel.DEDICATED:
            return
        if self.cores is None:
            raise IsolationUnavailable(
                "no cores can be dedicated in this process", isolation_level=level.value, tenant_id=tenant_id
            )
        self.cores.reserve(tenant_id, limits.dedicated_cores)
        if self._supervisor is not None:
            self._supervisor.apply_cores()

    def release(self, tenant_id: str) -> None:
        """Give back what :meth:`prepare` reserved (the tenant was not created, or is gone)."""
        if self.cores is not None and self.cores.reserved(tenant_id):
            self.cores.release(tenant_id)
            if self._supervisor is not None:
                self._supervisor.apply_cores()

    def on_tenant_event(self, tenant_id: str, event: str) -> None:
        """Tenant-manager listener: forwarded to the supervisor. One is made for a
        ``process``, ``container`` or ``dedicated`` tenant created in a process that
        executes runs (:attr:`hosts_pools`); otherwise nothing starts here until a run
        needs it. A deleted tenant's dedicated cores are released."""
        if self._supervisor is None:
            if event == "deleted":
                self.release(tenant_id)
            wanted = (
                event == "created"
                and self.hosts_pools
                and self._tenant_level is not None
                and self._tenant_level(tenant_id) in EXECUTION_LEVELS
            )
            if not wanted:
                return
        self.supervisor.on_tenant_event(tenant_id, event)

    def close(self) -> None:
        """Stop the supervisor (every pool, its template): nothing outlives this. A later
        run (made with a function) starts a new one."""
        with self._lock:
            supervisor = self._supervisor
            if self._make is not None:  # made here: made again when needed
                self._supervisor = None
        if supervisor is not None:
            supervisor.close()

    async def aclose(self) -> None:
        """:meth:`close`, off the event loop."""
        await asyncio.to_thread(self.close)

    def execute(
        self,
        ctx: TenantContext,
        definition: AgentDefinition,
        prompt: str,
        *,
        output_tokens: int | None,
        limits: RunLimits,
        memory: MemoryStore,
        usage: RunUsage | None = None,
        on_usage: Callable[[RunUsage], None] | None = None,
    ) -> Awaitable[RunOutcome]:
        """The run of ``definition`` on ``prompt`` for ``ctx``'s tenant in one of its
        execution processes, to await (the same contract as
        :class:`~patinox.isolation.NamespaceExecutor`).

        Raises:
            TenantContextAlreadySet: at once, when the caller is inside another tenant's scope.
            InvalidRequest, UnknownModel, UnknownTool: when awaited, before anything runs.
            RunFailed: when awaited: the run failed (the reasons of
                :func:`patinox.agents.run_agent`, and ``timeout``, ``cpu_limit``,
                ``memory_limit``, ``disk_limit``, ``worker_crashed``), with its usage so far.
        """
        active = current_tenant_or_none()
        if active is not None and active.tenant_id != ctx.tenant_id:
            raise TenantContextAlreadySet(
                "executing a run for one tenant inside another tenant's scope",
                active_tenant_id=active.tenant_id,
            )
        return (
            _HostRun(self.supervisor, ctx, definition, prompt, output_tokens, limits, memory, usage, on_usage)
            .with_fetcher(GuardedFetcher(ctx, self.egress))
            .run()
        )


class _HostRun:
    """One run's host side (see the module docstring)."""

    def __init__(
        self,
        supervisor: PoolSupervisor,
        ctx: TenantContext,
        definition: AgentDefinition,
        prompt: str,
        output_tokens: int | None,
        limits: RunLimits,
        memory: MemoryStore,
        usage: RunUsage | None,
        on_usage: Callable[[RunUsage], None] | None,
    ) -> None:
        self.supervisor = supervisor
        self.ctx = ctx
        self.definition = definition
        self.prompt = prompt
        self.output_tokens = output_tokens
        self.limits = limits
        self.memory = memory
        self.usage = RunUsage() if usage is None else usage
        self.on_usage = on_usage
        self.started = time.perf_counter()
        self.cpu_seconds: float | None = None
        self.peak_memory_bytes: int | None = None
        self.tool_calls = 0
        #: Whether the process running it sent anything of it yet.
        self.heard = False
        self.fetcher: GuardedFetcher | None = None

    def with_fetcher(self, fetcher: GuardedFetcher) -> _HostRun:
        """This run, making its ``http_fetch`` calls with ``fetcher`` (none: each is refused)."""
        self.fetcher = fetcher
        return self

    async def run(self) -> RunOutcome:
        _check_output_tokens(self.output_tokens, self.limits)
        validate_tool_names(self.definition.tools)
        model = resolve_model(self.definition.model, api_key=self.definition.provider_key)
        pool = self._pool()
        proc: ExecutionProcess | None = None
        reuse = False
        deadline = asyncio.timeout(self.limits.timeout_s)
        try:
            async with deadline:
                for offer in range(_OFFERS):
                    proc = await pool.acquire()
                    if proc.tenant_id != self.ctx.tenant_id:
                        raise TenantContextAlreadySet(
                            "an execution process bound to another tenant was offered for this run",
                            active_tenant_id=proc.tenant_id,
                        )
                    try:
                        outcome, reuse = await self._in(proc, pool, model, last=offer + 1 == _OFFERS)
                    except _NotTaken:
                        pool.release(proc, reuse=False)
                        proc = None
                        continue
                    return outcome
                raise AssertionError("unreachable")  # the last offer returns or raises RunFailed
        except TimeoutError:
            if not deadline.expired():
                raise
            if proc is not None:
                proc.kill("timeout")
            raise self._failed(
                "timeout", f"the run exceeded its timeout of {self.limits.timeout_s} s"
            ) from None
        except (PoolStopped, SpawnFailed) as err:
            raise self._failed("worker_crashed", f"no execution process for the run: {err}") from err
        except BaseException:  # cancelled, or failed by the host mid-run: the process is mid-run
            if proc is not None and not reuse:
                proc.kill("abandoned")
            raise
        finally:
            if proc is not None:
                pool.release(proc, reuse=reuse)

    def _pool(self) -> TenantPool:
        """The tenant's pool (started if it was not).

        Raises:
            RunFailed: the OS refused its cgroup, directory or identity, or it stopped.
            TenantContextAlreadySet: the supervisor offered another tenant's pool.
        """
        try:
            pool = self.supervisor.pool(self.ctx.tenant_id, self.ctx.limits, level=self.ctx.isolation_level)
        except PatinoxError as err:  # its cgroup, directory or identity: the OS refused
            raise self._failed(
                err.code, f"the tenant's execution pool could not start: {err.message}"
            ) from err
        except (OSError, PoolStopped) as err:
            raise self._failed(
                "worker_crashed", f"the tenant's execution pool could not start: {err}"
            ) from err
        if pool.tenant_id != self.ctx.tenant_id:
            raise TenantContextAlreadySet(
                "an execution pool of another tenant was offered for this run",
                active_tenant_id=pool.tenant_id,
            )
        return pool

    async def _in(
        self, proc: ExecutionProcess, pool: TenantPool, model: Model, *, last: bool
    ) -> tuple[RunOutcome, bool]:
        """The run in ``proc``: its outcome, and whether ``proc`` may serve another run.

        Raises:
            RunFailed: the run failed (in the process, or the process died).
            _NotTaken: unless ``last``, ``proc`` died before it answered the run.
        """
        loop = asyncio.get_running_loop()
        # Its CPU time when its last run ended (it waits idle between runs), else now.
        cpu_before = proc.cpu_mark if proc.cpu_mark is not None else proc.cpu_seconds()
        proc.reset_peak()
        watch = _CpuWatch(
            proc, cpu_before, self.ctx.limits.cpu_seconds_per_run, self.supervisor.settings.cpu_poll_s
        )
        watch.arm(loop)
        self.heard = False
        try:
            await proc.channel.send(self._run_message(model))
            result = await self._serve(proc, model)
        except (ChannelClosed, ProtocolError) as err:
            watch.cancel()
            if (
                not last
                and isinstance(err, ChannelClosed)
                and not self.heard
                and proc.killed_for is None
                and not proc.oom_killed()
            ):
                # It died before it said a word of the run (killed while idle, not yet
                # reaped): no model request, memory call or tool happened; offer another.
                raise _NotTaken(str(err)) from err
            self._measure(proc, cpu_before, watch.last)
            raise await self._died(proc, err) from err
        finally:
            watch.cancel()
        self._measure(proc, cpu_before, watch.last)
        if pool.sandboxed and proc.oom_killed():
            # A python tool's child was OOM-killed; the process lives on but is not reused.
            limit = self.ctx.limits.exec_memory_bytes
            raise self._failed(
                "memory_limit",
                f"the tenant's execution processes ran out of memory ({limit} bytes)",
                limit=limit,
            )
        if isinstance(result, Done):
            self.usage.tool_calls = max(self.usage.tool_calls, result.tool_calls)
            return self._outcome(result), True
        raise self._from_failed(result)

    def _run_message(self, model: Model) -> Run:
        d, limits = self.definition, self.limits
        return Run(
            tenant_id=self.ctx.tenant_id,
            context=self.ctx,
            name=d.name,
            instructions=d.instructions,
            model=d.model,
            tools=d.tools,
            model_name=model.model_name,
            model_system=model.system,
            prompt=self.prompt,
            output_tokens=self.output_tokens,
            max_output_tokens=limits.max_output_tokens,
            max_tool_calls=limits.max_tool_calls,
            timeout_s=limits.timeout_s,
            max_total_tokens=limits.max_total_tokens,
        )

    async def _serve(self, proc: ExecutionProcess, model: Model) -> Done | Failed:
        """Answer the process's requests until it reports the run's end (:attr:`heard`
        once it sent anything).

        Raises:
            ChannelClosed, ProtocolError: the process died or misbehaved.
        """
        channel = proc.channel
        while True:
            message = await channel.receive()
            self.heard = True
            if isinstance(message, ModelRequest):
                await channel.send(await self._model_request(message, model, proc))
            elif isinstance(message, MemoryCall):
                await channel.send(self._memory_call(message))
            elif isinstance(message, FetchCall):
                await channel.send(await self._fetch_call(message, proc))
            elif isinstance(message, Done | Failed):
                return message
            elif isinstance(message, Refused):
                raise ProtocolError(f"the execution process refused to go on: {message.reason}")
            else:
                raise ProtocolError(f"unexpected {message.type} from an execution process during a run")

    async def _model_request(self, message: ModelRequest, model: Model, proc: ExecutionProcess) -> ModelReply:
        """Make the process's model request with the real model, count its usage.

        Raises:
            ChannelClosed: the process died while the model answered (the response in
                flight is not counted, as for a cancelled run).
        """
        self.tool_calls = max(self.tool_calls, message.tool_calls)
        self.usage.tool_calls = max(self.usage.tool_calls, message.tool_calls)
        usage, limits = self.usage, self.limits
        # The process enforces these first (pydantic-ai's usage limits); the host does not
        # trust it to: a request past them fails the run as the process would have.
        if usage.requests >= request_limit_for(limits):
            limit = request_limit_for(limits)
            raise self._failed("request_limit", f"the run made more than {limit} model requests", limit=limit)
        if limits.max_total_tokens is not None and usage.total_tokens > limits.max_total_tokens:
            raise self._failed("usage_limit", "a usage limit was exceeded: the run's total tokens")
        settings: dict[str, Any] = dict(message.settings or {})
        settings.pop("max_tokens", None)
        if self.output_tokens is not None:
            settings["max_tokens"] = self.output_tokens
        elif not is_simulated(self.definition.model):
            settings["max_tokens"] = limits.max_output_tokens
        # Made in this task (no task of its own: that costs two turns of the loop per
        # request); the process's death cancels it here, as asyncio.timeout does.
        watch = _DeathWatch(proc)
        try:
            response = await model.request(
                message.messages,
                settings or None,  # type: ignore[arg-type]
                message.parameters,
            )
        except asyncio.CancelledError:
            if watch.cancelled_by_death():
                raise ChannelClosed(
                    "the execution process died while its model request was answered"
                ) from None
            raise
        except Exception as exc:  # the process raises it again, and fails as it would in process
            return ModelReply(tenant_id=self.ctx.tenant_id, error=ErrorData.of(exc))
        finally:
            watch.close()
        usage.requests += 1
        usage.incr(response.usage)
        if self.on_usage is not None:
            try:
                self.on_usage(usage)
            except Exception as exc:
                raise self._failed("internal_error", f"the run failed: {type(exc).__name__}") from exc
        return ModelReply(tenant_id=self.ctx.tenant_id, response=response)

    def _memory_call(self, call: MemoryCall) -> MemoryReply:
        """Serve a memory tool's call on the run's store (bound to the tenant by the host)."""
        tenant_id, store = self.ctx.tenant_id, self.memory
        try:
            if call.op == "get":
                return MemoryReply(tenant_id=tenant_id, value=store.memory_get(call.key))
            if call.op == "put":
                store.memory_put(call.key, call.value)
                return MemoryReply(tenant_id=tenant_id)
            return MemoryReply(tenant_id=tenant_id, keys=store.memory_list(call.prefix, call.limit))
        except Exception as exc:
            return MemoryReply(tenant_id=tenant_id, error=ErrorData.of(exc))

    async def _fetch_call(self, call: FetchCall, proc: ExecutionProcess) -> FetchReply:
        """Make an ``http_fetch`` call here, through the guard, under the tenant's egress
        policy (an error goes back to the process, which reports it to the model).

        Raises:
            ChannelClosed: the process died while the fetch was made.
        """
        tenant_id = self.ctx.tenant_id
        if self.fetcher is None:
            return FetchReply(
                tenant_id=tenant_id,
                error=ErrorData.of(EgressRefused("this run has no egress", reason="no_egress")),
            )
        watch = _DeathWatch(proc)
        try:
            page = await self.fetcher.fetch(call.url)
        except asyncio.CancelledError:
            if watch.cancelled_by_death():
                raise ChannelClosed("the execution process died while its fetch was made") from None
            raise
        except PatinoxError as exc:
            return FetchReply(tenant_id=tenant_id, error=ErrorData.of(exc))
        finally:
            watch.close()
        return FetchReply(
            tenant_id=tenant_id,
            status=page.status,
            content_type=page.content_type,
            body=page.body,
            url=page.url,
        )

    def _measure(self, proc: ExecutionProcess, cpu_before: float | None, last_seen: float | None) -> None:
        """The run's CPU seconds and peak memory (a dead process's CPU time as last seen)."""
        cpu_after = proc.cpu_seconds()
        proc.cpu_mark = cpu_after
        if cpu_after is None:
            cpu_after = last_seen
        if cpu_before is not None and cpu_after is not None:
            self.cpu_seconds = max(0.0, cpu_after - cpu_before)
        self.peak_memory_bytes = proc.peak_memory_bytes()

    async def _died(self, proc: ExecutionProcess, err: Exception) -> RunFailed:
        """Why ``proc`` stopped answering, as the run's failure (it is killed if it lives)."""
        if proc.killed_for == "cpu_limit":
            limit = self.ctx.limits.cpu_seconds_per_run
            return self._failed("cpu_limit", f"the run used more than its {limit} CPU seconds", limit=limit)
        if isinstance(err, ProtocolError):
            proc.kill("protocol_error")
            return self._failed("worker_crashed", f"the execution process misbehaved: {err}")
        died = proc.exit_watch()
        try:
            await asyncio.wait_for(asyncio.shield(died), _EXIT_WAIT_S)
        except TimeoutError:
            proc.kill("unresponsive")
        finally:
            proc.unwatch(died)
        status = proc.exit.result() if proc.exit.done() else None
        if proc.oom_killed():
            limit = self.ctx.limits.exec_memory_bytes
            return self._failed(
                "memory_limit",
                f"the tenant's execution processes ran out of memory ({limit} bytes)",
                limit=limit,
            )
        if self.supervisor.workdir_full(self.ctx.tenant_id):
            return self._failed("disk_limit", "the tenant's writable directory is full")
        if status is None:
            how = "stopped answering"
        elif status < 0:
            how = f"was killed by signal {-status}"
        else:
            how = f"exited with status {status}"
        return self._failed("worker_crashed", f"the execution process {how} during the run")

    def _failed(self, reason: str, message: str, **extra: Any) -> RunFailed:
        """The run's failure with its usage so far (the host's count)."""
        usage = self.usage
        return RunFailed(
            message,
            reason=reason,
            model=self.definition.model,
            simulated=is_simulated(self.definition.model),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            tool_calls=max(usage.tool_calls, self.tool_calls),
            requests=usage.requests,
            duration_ms=(time.perf_counter() - self.started) * 1000,
            cpu_seconds=self.cpu_seconds,
            peak_memory_bytes=self.peak_memory_bytes,
            **extra,
        )

    def _from_failed(self, failed: Failed) -> PatinoxError:
        """The error for the process's :class:`Failed`, with the host's usage."""
        if failed.code != RunFailed.code:
            return ErrorData(kind="patinox", name="", code=failed.code, message=failed.message).to_error()
        self.tool_calls = max(self.tool_calls, failed.tool_calls)
        reason = failed.reason if failed.reason in _REASONS else "internal_error"
        extra = {k: v for k, v in failed.fields.items() if k in ("tool", "limit")}
        return self._failed(reason, failed.message, **extra)

    def _outcome(self, done: Done) -> RunOutcome:
        usage = self.usage
        return RunOutcome(
            output=done.output,
            model=self.definition.model,
            simulated=is_simulated(self.definition.model),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            tool_calls=done.tool_calls,
            requests=usage.requests,
            duration_ms=(time.perf_counter() - self.started) * 1000,
            cpu_seconds=self.cpu_seconds,
            peak_memory_bytes=self.peak_memory_bytes,
        )


class _DeathWatch:
    """Cancels the current task when ``proc`` exits, until :meth:`close` (the host's model
    request for the process: a response nobody waits for is not worth waiting for)."""

    __slots__ = ("_died", "_fired", "_proc", "_task")

    def __init__(self, proc: ExecutionProcess) -> None:
        task = asyncio.current_task()
        assert task is not None, "a model request is served inside a task"
        self._proc = proc
        self._task: asyncio.Task[Any] | None = task
        self._fired = False
        self._died = proc.exit_watch()
        self._died.add_done_callback(self._on_death)

    def _on_death(self, _: asyncio.Future[None]) -> None:
        # A loop callback: the task is suspended, in the request or (after close) elsewhere.
        if self._task is not None:
            self._fired = True
            self._task.cancel()

    def cancelled_by_death(self) -> bool:
        """Whether the ``CancelledError`` being handled came from the process's death alone
        (then it is taken back); ``False`` when someone else cancelled the task too."""
        if not self._fired or self._task is None:
            return False
        self._fired = False
        return self._task.uncancel() == 0

    def close(self) -> None:
        """Stop watching (a death reported later cancels nothing). A cancellation the
        request swallowed is taken back."""
        if self._fired and self._task is not None:
            self._task.uncancel()
        self._task = None
        self._proc.unwatch(self._died)
        self._died.cancel()


class _CpuWatch:
    """Polls a process's CPU seconds during a run (a timer callback on the loop, no task)
    and kills it past ``limit_s`` (``killed_for="cpu_limit"``)."""

    __slots__ = ("_before", "_handle", "_interval", "_limit", "_proc", "last")

    def __init__(
        self, proc: ExecutionProcess, before: float | None, limit_s: float, interval_s: float
    ) -> None:
        self._proc = proc
        self._before = before
        #: The process's CPU seconds at the last poll (``None`` before the first).
        self.last: float | None = None
        self._limit = limit_s
        self._interval = interval_s
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._before is not None and math.isfinite(self._limit):
            self._handle = loop.call_later(self._interval, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._proc.cpu_seconds()
        if now is None or self._before is None:
            return
        self.last = now
        if now - self._before > self._limit:
            self._proc.kill("cpu_limit")
            self._handle = None
            return
        self._handle = loop.call_later(self._interval, self._check, loop)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _check_output_tokens(output_tokens: int | None, limits: RunLimits) -> None:
    """As :func:`patinox.agents.run_agent` checks it, before anything runs."""
    if output_tokens is None:
        return
    if (
        isinstance(output_tokens, bool)
        or not isinstance(output_tokens, int)
        or not (1 <= output_tokens <= limits.max_output_tokens)
    ):
        raise InvalidRequest(
            f"output_tokens must be an integer from 1 to {limits.max_output_tokens}, got {output_tokens!r}",
            field="output_tokens",
            limit=limits.max_output_tokens,
        )
