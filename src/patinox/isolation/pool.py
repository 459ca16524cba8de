"""Warm pools of tenant execution processes: one tenant's on this host.

:class:`TenantPool` holds one tenant's warm execution processes on this host: at most
``min(limits.execution_processes, limits.max_concurrent_runs)`` of them, each bound to the
tenant, reused run after run. A run borrows one (:meth:`TenantPool.acquire`, waiting for
a free one when all are busy) and gives it back (:meth:`TenantPool.release`); a process
that crashed, was killed or ended its run abnormally is not reused, and the pool starts a
replacement. A pool with no run for ``idle_s`` seconds stops its processes (scaled to
zero) and starts them again on the next run. The host's handle on each process is an
:class:`~patinox.isolation.execution.ExecutionProcess`.

The pools are made and owned by the host's
:class:`~patinox.isolation.supervisor.PoolSupervisor`, which gives each the tenant's
template, cgroup, writable directory and execution identity.

Nothing here binds to an event loop: processes are forked and bound by worker threads,
exits are reported by the template's thread, and :meth:`TenantPool.acquire` waits on the
loop it is called from. One supervisor can serve one event loop after another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from patinox.errors import PatinoxError
from patinox.isolation.cgroups import ProcessCgroup, TenantCgroup
from patinox.isolation.channel import (
    Bind,
    BlockingChannel,
    HostChannel,
    ProtocolError,
    Ready,
    decode_process_message,
)
from patinox.isolation.container import peer_pid, place
from patinox.isolation.execution import ExecutionProcess, resolve_waiter
from patinox.isolation.sandbox import SANDBOX_WORKDIR
from patinox.isolation.template import Template, TemplateUnavailable
from patinox.tenancy import IsolationLevel, ResourceLimits

__all__ = [
    "EXECUTION_LEVELS",
    "SANDBOXED_LEVELS",
    "START_ERRORS",
    "ExecutionProcess",
    "PoolSettings",
    "PoolStopped",
    "SpawnFailed",
    "TenantPool",
    "basic_rlimits",
]

log = structlog.get_logger("patinox.isolation")

#: The levels whose execution processes run in pools of this module.
EXECUTION_LEVELS = frozenset({IsolationLevel.PROCESS, IsolationLevel.CONTAINER, IsolationLevel.DEDICATED})
#: The levels whose pools fork from a template of their own in the tenant's sandbox.
SANDBOXED_LEVELS = frozenset({IsolationLevel.CONTAINER, IsolationLevel.DEDICATED})


class PoolStopped(Exception):
    """The tenant's pool was stopped (the tenant suspended, deleted or moved to another level)."""


class SpawnFailed(Exception):
    """An execution process could not be started or bound (the message says why)."""


def basic_rlimits(limits: ResourceLimits) -> list[tuple[int, int, int]]:
    """The rlimits of an execution process when no cgroup support was detected (tests,
    embedders): ``RLIMIT_NOFILE`` = ``max_open_files``, no core files. A supervisor made by
    :meth:`~patinox.isolation.supervisor.PoolSupervisor.on_this_host` uses
    :func:`~patinox.isolation.cgroups.rlimits_for`."""
    return [
        (resource.RLIMIT_NOFILE, limits.max_open_files, limits.max_open_files),
        (resource.RLIMIT_CORE, 0, 0),
    ]


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    """How the pools of one host process behave.

    Attributes:
        exec_root: where tenants' working directories are made (``<exec_root>/<tenant_id>``,
            mode 0700, owned by the tenant's execution uid; ``exec_root`` itself mode 0711).
        idle_s: a pool with no run for this long stops its processes, seconds.
        spawn_timeout_s: longest wait for a new process to be forked and bound, seconds.
        cpu_poll_s: how often a run's CPU time is checked against
            ``cpu_seconds_per_run``, seconds.
        maintenance_s: how often idle pools are looked for, seconds.
        spare_templates: pre-warmed sandboxed templates kept ready, not yet bound to any
            tenant, on a host that offers ``container`` (as root): a ``container`` or
            ``dedicated`` tenant's first pool takes one instead of starting its template
            cold (seconds: bubblewrap and an interpreter importing the agent stack). 0
            turns them off.
    """

    exec_root: Path
    idle_s: float = 300.0
    spawn_timeout_s: float = 60.0
    cpu_poll_s: float = 0.25
    maintenance_s: float = 1.0
    spare_templates: int = 1


#: What stops a pool from starting (a cgroup, a mount, an identity).
START_ERRORS = (PatinoxError, OSError, PoolStopped)


class TenantPool:
    """One tenant's warm execution processes on this host (see the module docstring).

    Made by :meth:`~patinox.isolation.supervisor.PoolSupervisor.pool`; thread-safe.

    Attributes:
        tenant_id: the tenant every process of the pool is bound to.
        limits: the tenant's effective limits the pool was last given.
        cgroup: the tenant's cgroup, when cgroups are in use.
        workdir: the tenant's writable directory the processes work in.
        uid, gid: the tenant's execution identity (``None``: not root, processes keep the host's).
    """

    def __init__(
        self,
        tenant_id: str,
        limits: ResourceLimits,
        *,
        template: Template,
        spawner: concurrent.futures.Executor,
        settings: PoolSettings,
        rlimits: Sequence[tuple[int, int, int]],
        workdir: Path | None,
        uid: int | None,
        gid: int | None,
        cgroup: TenantCgroup | None = None,
        on_ready: Callable[[float], None] | None = None,
        level: IsolationLevel = IsolationLevel.PROCESS,
    ) -> None:
        self.tenant_id = tenant_id
        #: The isolation level it serves; above ``process`` its template (its own) runs in
        #: the tenant's sandbox, and its processes get the ``python`` tool.
        self.level = level
        self.sandboxed = level in SANDBOXED_LEVELS
        self.limits = limits
        self.cgroup = cgroup
        self.workdir = workdir
        self.uid = uid
        self.gid = gid
        self._template = template
        self._spawner = spawner
        self._settings = settings
        self._rlimits = list(rlimits)
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._live: set[ExecutionProcess] = set()
        self._idle: list[ExecutionProcess] = []
        self._busy: set[ExecutionProcess] = set()
        self._starting = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._generation = 0
        self._names = 0
        self._warm = False
        self._stopped = False
        self._last_active = time.monotonic()

    @property
    def template(self) -> Template:
        """The template its processes are forked from (its own in a sandbox above ``process``)."""
        return self._template

    @property
    def size(self) -> int:
        """Most processes the pool keeps: ``min(execution_processes, max_concurrent_runs)``."""
        return min(self.limits.execution_processes, self.limits.max_concurrent_runs)

    def processes(self) -> list[ExecutionProcess]:
        """Its live processes, idle and busy."""
        with self._lock:
            return list(self._live)

    def counts(self) -> tuple[int, int, int]:
        """``(live, idle, starting)`` processes now."""
        with self._lock:
            return len(self._live), len(self._idle), self._starting

    @property
    def warm(self) -> bool:
        """Whether it keeps its processes started (false once scaled to zero, until a run)."""
        return self._warm

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def acquire(self) -> ExecutionProcess:
        """A free process of the tenant, marked busy; waits (on the running loop) for one
        to be started or given back. Bound the wait with the run's timeout.

        Raises:
            PoolStopped: the pool was stopped.
            SpawnFailed: the process started for this call could not start.
        """
        loop = asyncio.get_running_loop()
        job: concurrent.futures.Future[None] | None = None
        while True:
            with self._lock:
                if self._stopped:
                    raise PoolStopped(f"the execution pool of tenant {self.tenant_id} was stopped")
                self._warm = True
                self._last_active = time.monotonic()
                while self._idle:
                    proc = self._idle.pop()
                    if proc.alive:
                        self._busy.add(proc)
                        return proc
                if job is not None and job.done() and job.exception() is not None:
                    raise SpawnFailed(str(job.exception()))
                spawn = job is None and len(self._live) + self._starting < self.size
                if spawn:
                    self._starting += 1
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
            if spawn:
                job = self._spawner.submit(self._spawn)
            try:
                await waiter
            finally:
                with self._lock, contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def release(self, proc: ExecutionProcess, *, reuse: bool) -> None:
        """Give ``proc`` back after a run: idle again when ``reuse`` (the run ended
        normally) and it still fits the pool; otherwise it is killed and replaced."""
        with self._lock:
            self._busy.discard(proc)
            self._last_active = time.monotonic()
            keep = (
                reuse
                and proc.alive
                and not self._stopped
                and proc.generation == self._generation
                and len(self._live) <= self.size
            )
            if keep:
                proc.runs += 1
                self._idle.append(proc)
        if not keep:
            if proc.alive:
                proc.kill(proc.killed_for or "discarded")  # discarded when it has exited
            else:
                self._discard(proc)
        self._wake()

    def warm_up(self) -> None:
        """Start processes until the pool holds :attr:`size` of them (in the background)."""
        with self._lock:
            if self._stopped:
                return
            self._warm = True
            self._last_active = time.monotonic()
        self._refill()

    def wait_stopped(self, timeout_s: float) -> None:
        """Wait (blocking, at most ``timeout_s`` per process) until every process of the
        pool has exited; after :meth:`stop`."""
        for proc in self.processes():
            with contextlib.suppress(concurrent.futures.TimeoutError):
                proc.exit.result(timeout_s)

    def idle_for(self, now: float | None = None) -> float | None:
        """Seconds since its last run began or ended, while warm with no run; else ``None``."""
        with self._lock:
            if not self._warm or self._busy or self._stopped:
                return None
            return (time.monotonic() if now is None else now) - self._last_active

    def scale_to_zero(self) -> int:
        """Stop its idle processes and start none until the next run; returns how many
        (nothing happens while a run holds a process)."""
        with self._lock:
            if self._busy:
                return 0
            self._warm = False
            idle, self._idle = self._idle, []
        for proc in idle:
            proc.kill("idle")
        return len(idle)

    def update(self, limits: ResourceLimits, rlimits: Sequence[tuple[int, int, int]]) -> None:
        """Take the tenant's new limits: idle processes are replaced by ones bound with the
        new rlimits; busy ones are replaced when their run ends."""
        with self._lock:
            self.limits = limits
            self._rlimits = list(rlimits)
            self._generation += 1
            idle, self._idle = self._idle, []
        for proc in idle:
            proc.kill("limits_changed")
        self._refill()

    def stop(self) -> None:
        """Kill every process of the pool and refuse runs from now on (idempotent)."""
        with self._lock:
            self._stopped = True
            self._warm = False
            procs = list(self._live)
            self._idle = []
        for proc in procs:
            proc.kill("stopped")
        self._wake()

    # -- internals -----------------------------------------------------------------------------

    def _wake(self) -> None:
        """Wake every waiting :meth:`acquire`, on its own loop, from any thread."""
        with self._lock:
            waiters = list(self._waiters)
        if not waiters:
            return
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for waiter in waiters:
            loop = waiter.get_loop()
            if loop is here:
                resolve_waiter(waiter)
            else:
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    loop.call_soon_threadsafe(resolve_waiter, waiter)

    def _refill(self) -> None:
        with self._lock:
            if not self._warm or self._stopped:
                return
            missing = max(0, self.size - len(self._live) - self._starting)
            self._starting += missing
        for _ in range(missing):
            self._spawner.submit(self._spawn)

    def _spawn(self) -> None:
        """Start one process into the idle list (a worker thread); ``_starting`` was
        counted by the caller."""
        try:
            proc = self._start_one()
        except BaseException as err:
            with self._lock:
                self._starting -= 1
                stopped = self._stopped
            # A pool stopped meanwhile (tenant suspended, deleted or moved) closed what the
            # start was waiting on: expected, not a fault.
            say = log.debug if stopped else log.warning
            say("execution process failed to start", tenant_id=self.tenant_id, error=str(err))
            self._wake()
            raise
        with self._lock:
            self._starting -= 1
            fits = not self._stopped and proc.generation == self._generation
            self._live.add(proc)
            if fits:
                self._idle.append(proc)
        if not fits:
            proc.kill("stopped")
        proc.exit.add_done_callback(lambda _: self._exited(proc))
        self._wake()

    def _start_one(self) -> ExecutionProcess:
        """Fork a process, bind it to the tenant and wait for its ``Ready`` (blocking)."""
        with self._lock:
            generation = self._generation
            rlimits = list(self._rlimits)
            self._names += 1
            name = f"p{self._names}"
        try:
            self._template.wait_ready()
        except TemplateUnavailable as err:
            raise SpawnFailed(str(err)) from err
        try:
            cgroup = self.cgroup.child(name) if self.cgroup is not None else None
        except PatinoxError as err:
            raise SpawnFailed(f"the execution process's cgroup could not be made: {err.message}") from err
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.sandboxed:  # its Ready then carries its host pid
            host.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        started = time.perf_counter()
        try:
            try:
                pid, exit_status = self._template.spawn(child, timeout_s=self._settings.spawn_timeout_s)
            finally:
                child.close()
        except TemplateUnavailable as err:
            host.close()
            if cgroup is not None:
                with contextlib.suppress(PatinoxError, OSError):
                    cgroup.remove()
            raise SpawnFailed(str(err)) from err
        try:
            host.settimeout(self._settings.spawn_timeout_s)
            channel = BlockingChannel(host)
            channel.send(self._bind(rlimits, cgroup))
            host_pid = peer_pid(host) if self.sandboxed else pid
            ready = decode_process_message(channel.receive_body())
            if not isinstance(ready, Ready):
                raise SpawnFailed(
                    f"the execution process did not start: {getattr(ready, 'reason', ready.type)}"
                )
            if self.sandboxed and os.geteuid() == 0:
                place(host_pid, cgroup)
            host.settimeout(None)
        except (OSError, ProtocolError, SpawnFailed, PatinoxError) as err:
            self._template.kill(pid)
            host.close()
            if cgroup is not None:
                with contextlib.suppress(PatinoxError, OSError, concurrent.futures.TimeoutError):
                    exit_status.result(5)
                    cgroup.remove()
            raise err if isinstance(err, SpawnFailed) else SpawnFailed(str(err)) from err
        ready_ms = (time.perf_counter() - started) * 1000
        if self._on_ready is not None:
            self._on_ready(ready_ms)
        return ExecutionProcess(
            tenant_id=self.tenant_id,
            pid=pid,
            uid=ready.uid,
            gid=ready.gid,
            channel=HostChannel(host),
            exit=exit_status,
            template=self._template,
            cgroup=cgroup,
            generation=generation,
            ready_ms=ready_ms,
            host_pid=host_pid,
        )

    def _bind(self, rlimits: list[tuple[int, int, int]], cgroup: ProcessCgroup | None) -> Bind:
        """The new process's binding: in a sandbox it is already the tenant's uid in
        ``/work`` and the host places it in its cgroup; it gets the ``python`` tool."""
        if self.sandboxed:
            return Bind(
                tenant_id=self.tenant_id,
                workdir=SANDBOX_WORKDIR,
                rlimits=rlimits,
                code_timeout_s=self.limits.code_timeout_s,
                code_output_bytes=self.limits.code_output_bytes,
            )
        return Bind(
            tenant_id=self.tenant_id,
            uid=self.uid,
            gid=self.gid,
            workdir=None if self.workdir is None else str(self.workdir),
            rlimits=rlimits,
            cgroup_procs=[] if cgroup is None else [str(p) for p in cgroup.procs_files()],
        )

    def _discard(self, proc: ExecutionProcess) -> None:
        """Let go of a process that exited: its channel and files now, its cgroup in a
        worker thread (removing one waits until it is empty)."""
        proc.close()
        if proc.cgroup is not None:
            try:
                self._spawner.submit(proc.remove_cgroup)
            except RuntimeError:  # the supervisor is shutting down
                proc.remove_cgroup()

    def _exited(self, proc: ExecutionProcess) -> None:
        """``proc`` ended (the template's thread): forget it, replace it while warm."""
        with self._lock:
            self._live.discard(proc)
            with contextlib.suppress(ValueError):
                self._idle.remove(proc)
            held = proc in self._busy  # its run reads the end of file, then releases it
        if not held:
            self._discard(proc)
        self._refill()
        self._wake()
