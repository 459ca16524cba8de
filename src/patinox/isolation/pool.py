"""Warm pools of tenant execution processes, and the supervisor that owns them.

:class:`TenantPool` holds one tenant's warm execution processes on this host: at most
``min(limits.execution_processes, limits.max_concurrent_runs)`` of them, each bound to the
tenant, reused run after run. A run borrows one (:meth:`TenantPool.acquire`, waiting for
a free one when all are busy) and gives it back (:meth:`TenantPool.release`); a process
that crashed, was killed or ended its run abnormally is not reused, and the pool starts a
replacement. A pool with no run for ``idle_s`` seconds stops its processes (scaled to
zero) and starts them again on the next run.

:class:`PoolSupervisor` (one per host process that executes runs) owns the pools, the
template that forks their processes (:mod:`patinox.isolation.template`), and per tenant a
cgroup with a child per process, a writable directory and an execution identity (uid/gid)
when running as root. It starts a pool at a tenant's first run and when a tenant is
created, stops it when the tenant is suspended or deleted, and follows limit updates.

Nothing here binds to an event loop: processes are forked and bound by worker threads,
exits are reported by the template's thread, and :meth:`TenantPool.acquire` waits on the
loop it is called from. One supervisor can serve one event loop after another.

Per tenant the supervisor makes a cgroup (:mod:`patinox.isolation.cgroups`, where the
host's controllers are writable; its limits otherwise fall to rlimits), a writable
directory (:mod:`patinox.isolation.workdir`: a size-capped tmpfs as root) and, as root, an
execution uid/gid of its own; each process gets a child cgroup of its tenant's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import resource
import secrets
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from patinox.errors import IsolationUnavailable, PatinoxError
from patinox.isolation.cgroups import (
    CgroupCounters,
    CgroupManager,
    CgroupSupport,
    ProcessCgroup,
    TenantCgroup,
    detect_cgroups,
    rlimits_for,
)
from patinox.isolation.channel import (
    Bind,
    BlockingChannel,
    HostChannel,
    ProtocolError,
    Ready,
    decode_process_message,
)
from patinox.isolation.container import SandboxTemplate, peer_pid, place
from patinox.isolation.cores import CoreAllocator
from patinox.isolation.sandbox import SANDBOX_WORKDIR, SandboxSpec
from patinox.isolation.template import Template, TemplateUnavailable
from patinox.isolation.workdir import ExecIdentities, Workdirs
from patinox.tenancy import PLANS, IsolationLevel, ResourceLimits

__all__ = [
    "ExecutionProcess",
    "PoolSettings",
    "PoolStopped",
    "PoolSupervisor",
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
    :meth:`PoolSupervisor.on_this_host` uses :func:`~patinox.isolation.cgroups.rlimits_for`."""
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


# --- one process --------------------------------------------------------------------------------


class _ProcFiles:
    """A process's ``/proc`` files the host reads during each run, opened once (a read
    through a kept descriptor costs about a microsecond, an ``open`` tens): its CPU time
    (``schedstat``), its peak resident set (``status``) and the file that resets that
    peak (``clear_refs``). Descriptors of a process that exited fail to read (``ESRCH``),
    even if its pid is reused."""

    __slots__ = ("clear_refs", "schedstat", "status")

    def __init__(self, pid: int) -> None:
        self.schedstat = os.open(f"/proc/{pid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        self.status = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.clear_refs: int | None = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            self.clear_refs = None

    def cpu_seconds(self) -> float:
        return int(os.pread(self.schedstat, 256, 0).split()[0]) / 1e9

    def peak_resident_bytes(self) -> int | None:
        for line in os.pread(self.status, 8192, 0).splitlines():
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def reset_peak(self) -> None:
        if self.clear_refs is not None:
            os.write(self.clear_refs, b"5")

    def close(self) -> None:
        """Close the descriptors once (a second call does nothing: their numbers may
        already belong to other files)."""
        fds, self.schedstat, self.status, self.clear_refs = (
            (self.schedstat, self.status, self.clear_refs),
            -1,
            -1,
            None,
        )
        for fd in fds:
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _works(read: Callable[[], object]) -> bool:
    """Whether a cgroup reading works here (its controller is enforced and readable)."""
    try:
        read()
    except (PatinoxError, OSError):
        return False
    return True


class ExecutionProcess:
    """The host's handle on one warm execution process, bound to one tenant.

    Attributes:
        tenant_id: the tenant it is bound to.
        pid, uid, gid: the process and the identity it runs as.
        channel: its channel (:class:`~patinox.isolation.channel.HostChannel`).
        exit: its exit status once the template reaped it (``Popen.returncode`` style).
        cgroup: its own cgroup, below its tenant's, when cgroups are in use.
        ready_ms: milliseconds from the fork request to its ``Ready``.
        killed_for: why the host killed it (``cpu_limit``, ``timeout``, ``abandoned``...).
        runs: runs it finished and was given back after.
    """

    __slots__ = (
        "_cg_cpu",
        "_cg_memory",
        "_counters",
        "_proc_files",
        "_template",
        "_watchers",
        "cgroup",
        "channel",
        "cpu_mark",
        "exit",
        "generation",
        "gid",
        "host_pid",
        "killed_for",
        "pid",
        "ready_ms",
        "runs",
        "tenant_id",
        "uid",
    )

    def __init__(
        self,
        *,
        tenant_id: str,
        pid: int,
        uid: int,
        gid: int,
        channel: HostChannel,
        exit: concurrent.futures.Future[int],
        template: Template,
        cgroup: ProcessCgroup | None,
        generation: int,
        ready_ms: float,
        host_pid: int | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.pid = pid
        #: Its pid in the host's PID namespace (differs from ``pid``, the template's view,
        #: inside a sandbox).
        self.host_pid = pid if host_pid is None else host_pid
        self.uid = uid
        self.gid = gid
        self.channel = channel
        self.exit = exit
        self._template = template
        self.cgroup = cgroup
        self.generation = generation
        self.ready_ms = ready_ms
        self.killed_for: str | None = None
        self.runs = 0
        self._watchers: set[asyncio.Future[None]] = set()
        self._proc_files: _ProcFiles | None = None
        with contextlib.suppress(OSError):
            self._proc_files = _ProcFiles(self.host_pid)
        # The cgroup's accounting where the host has it (it counts every thread and child
        # of the process), else the process's own from /proc; its files opened once, here
        # (off the run's path), and read through the kept descriptors at each run.
        counters = None if cgroup is None else cgroup.counters()
        self._counters: CgroupCounters | ProcessCgroup | None = counters
        self._cg_cpu = counters is not None and _works(counters.cpu_seconds)
        self._cg_memory = counters is not None and _works(counters.memory_peak_bytes)
        if counters is not None and self._cg_memory:
            _works(counters.oom_kills)  # opened now too: read after every sandboxed run
        #: Its CPU seconds when its last run ended (``None`` before its first).
        self.cpu_mark: float | None = None
        exit.add_done_callback(self._exited)

    def _exited(self, _: concurrent.futures.Future[int]) -> None:
        for watcher in list(self._watchers):
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                watcher.get_loop().call_soon_threadsafe(_resolve, watcher)

    def exit_watch(self) -> asyncio.Future[None]:
        """A future of the running loop resolved once the process exits (give it back with
        :meth:`unwatch`). Cancelling it leaves :attr:`exit` alone."""
        watcher: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watchers.add(watcher)
        if self.exit.done():
            _resolve(watcher)
        return watcher

    def unwatch(self, watcher: asyncio.Future[None]) -> None:
        self._watchers.discard(watcher)

    @property
    def alive(self) -> bool:
        """Whether it has not exited (as far as the template reported)."""
        return not self.exit.done()

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL it (by the template, which kills only a child it has not reaped: never
        another process that got its pid); ``reason`` is kept as :attr:`killed_for`.
        Anything left in its cgroup is killed when the cgroup is removed."""
        if self.killed_for is None:
            self.killed_for = reason
        self._template.kill(self.pid)

    def cpu_seconds(self) -> float | None:
        """CPU time it used so far, seconds (its cgroup's, else its own from
        ``/proc/<pid>/schedstat``); ``None`` once it is gone."""
        try:
            if self._cg_cpu:
                assert self._counters is not None
                return self._counters.cpu_seconds()
            return None if self._proc_files is None else self._proc_files.cpu_seconds()
        except (PatinoxError, OSError, ValueError, IndexError):
            return None

    def peak_memory_bytes(self) -> int | None:
        """Its peak memory since :meth:`reset_peak`, bytes (its cgroup's, else its peak
        resident set from ``/proc/<pid>/status``); ``None`` when unknown."""
        try:
            if self._cg_memory:
                assert self._counters is not None
                return self._counters.memory_peak_bytes()
            return None if self._proc_files is None else self._proc_files.peak_resident_bytes()
        except (PatinoxError, OSError, ValueError, IndexError):
            return None

    def reset_peak(self) -> None:
        """Start measuring its peak memory afresh (best effort)."""
        try:
            if self._cg_memory:
                assert self._counters is not None
                self._counters.reset_peak()
            elif self._proc_files is not None:
                self._proc_files.reset_peak()
        except (PatinoxError, OSError):
            pass

    def oom_killed(self) -> bool:
        """Whether the OOM killer killed a process of its cgroup (read before the cgroup
        is removed); ``False`` without cgroup memory accounting."""
        if not self._cg_memory:
            return False
        assert self._counters is not None
        try:
            return self._counters.oom_kills() > 0
        except (PatinoxError, OSError):
            return False

    def close(self) -> None:
        """Close the host's end of its channel, its ``/proc`` files and its cgroup's kept
        accounting files (idempotent; later readings open its cgroup's files by path)."""
        with contextlib.suppress(OSError):
            self.channel.close()
        if self._proc_files is not None:
            self._proc_files.close()
        if isinstance(self._counters, CgroupCounters):
            self._counters.close()
            self._counters = self.cgroup

    def remove_cgroup(self) -> None:
        """Remove its cgroup (killing anything left in it). Blocking: a worker thread's job."""
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except (PatinoxError, OSError) as err:
                log.warning("an execution process's cgroup was not removed", pid=self.pid, error=str(err))


# --- one tenant's pool ----------------------------------------------------------------------------


class TenantPool:
    """One tenant's warm execution processes on this host (see the module docstring).

    Made by :meth:`PoolSupervisor.pool`; thread-safe.

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
                _resolve(waiter)
            else:
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    loop.call_soon_threadsafe(_resolve, waiter)

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


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


# --- the supervisor ---------------------------------------------------------------------------------


def _say_mechanisms(mechanisms: str) -> None:
    """Say at start-up what confines execution processes: in the process's log when it
    configured one (``patinox serve``, ``patinox worker``), else on stderr (never stdout,
    where ``patinox run`` prints its result)."""
    if structlog.is_configured():
        log.info("process isolation", mechanisms=mechanisms)
    else:
        print(f"patinox: process isolation: {mechanisms}", file=sys.stderr)


#: ``(isolation level, effective limits)`` of a live tenant, or ``None`` when it is gone.
TenantInfo = Callable[[str], tuple[IsolationLevel, ResourceLimits] | None]

#: What stops a pool from starting (a cgroup, a mount, an identity).
_START_ERRORS = (PatinoxError, OSError, PoolStopped)

#: A spare's cgroup limits until it is bound (then the tenant's apply): the largest plan's.
_SPARE_LIMITS = PLANS["enterprise"].limits
#: A spare's directory size until it is bound (then resized to the tenant's ``disk_bytes``).
_SPARE_DISK_BYTES = 1 << 20


@dataclass(frozen=True)
class Spare:
    """A pre-warmed sandboxed template bound to no tenant yet (:class:`PoolSupervisor`).

    Attributes:
        name: its placeholder id (``spare-<hex>``): its directory ``<exec_root>/<name>``,
            its cgroup ``<prefix>/<name>`` and its uid's holder until it is bound.
        uid, gid: the identity its sandbox runs as, given to the tenant that takes it.
        template: the template, started in its sandbox.
        cgroup: its cgroup (``template`` child holds the sandbox), when cgroups are in use.
    """

    name: str
    uid: int
    gid: int
    template: SandboxTemplate
    cgroup: TenantCgroup | None


class PoolSupervisor:
    """The execution pools of this host process (see the module docstring). Thread-safe.

    Args:
        settings: how pools behave.
        template: the template to fork from (shared, not closed by :meth:`close`);
            default: one of its own, started at the first pool.
        cgroups: the host's tenant cgroups; ``None``: none (rlimits only).
        workdirs: the tenants' writable directories (default: under
            ``settings.exec_root``).
        identities: execution uid/gid per tenant, used when running as root (default:
            :class:`~patinox.isolation.workdir.ExecIdentities` from 100000).
        rlimits: the rlimits of a tenant's processes from its limits (default
            :func:`basic_rlimits`).
        tenant_info: a tenant's isolation level and limits, for tenant events.
        support: what the host's cgroups enforce, for :meth:`mechanisms`.
        cores: the cores of ``dedicated`` tenants (a tenant's reservation is made by
            :meth:`~patinox.isolation.process.ProcessExecutor.prepare` when it is created,
            and again here at its pool's start); default: one over this process's CPUs.
        sandboxes: this host offers the ``container`` level: keep
            ``settings.spare_templates`` pre-warmed sandboxed templates (as root), started
            in the background now and refilled after one is taken.

    Spares. A ``container``/``dedicated`` tenant's template is bubblewrap plus an
    interpreter importing the agent stack: seconds to start. A spare is one started ahead
    as a placeholder (``spare-<hex>``: its own uid, a small tmpfs bound at ``/work``, its
    own cgroup). A new tenant's first sandboxed pool (no uid, no directory yet) takes one
    and binds it (:meth:`_bind_spare`): the uid passes to the tenant
    (:meth:`~patinox.isolation.workdir.ExecIdentities.adopt`), the tmpfs becomes the
    tenant's directory (:meth:`~patinox.isolation.workdir.Workdirs.adopt`: resized to
    ``disk_bytes``, owned by the uid), every process of the spare's cgroup moves into the
    tenant's ``template`` group; from then on it is the tenant's template as if started
    for it. The memory the template touched before binding stays charged to the parent
    group (cgroup v2 does not move charges); what it allocates after is the tenant's.
    """

    def __init__(
        self,
        *,
        settings: PoolSettings,
        template: Template | None = None,
        cgroups: CgroupManager | None = None,
        workdirs: Workdirs | None = None,
        identities: ExecIdentities | None = None,
        rlimits: Callable[[ResourceLimits], list[tuple[int, int, int]]] | None = None,
        tenant_info: TenantInfo | None = None,
        support: CgroupSupport | None = None,
        cores: CoreAllocator | None = None,
        sandboxes: bool = False,
    ) -> None:
        self.settings = settings
        self.cores = cores or CoreAllocator()
        self._templates: dict[str, SandboxTemplate] = {}
        self._owns_template = template is None
        self.template = template or Template()
        self.cgroups = cgroups
        self.workdirs = workdirs or Workdirs(settings.exec_root)
        self._identities = identities or ExecIdentities()
        self._rlimits = rlimits or basic_rlimits
        self._tenant_info = tenant_info
        self._support = support
        self._root = os.geteuid() == 0
        self._spawner = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="patinox-spawn"
        )
        self._pools: dict[str, TenantPool] = {}
        self._grouped: set[str] = set()  # tenants whose cgroup this supervisor made
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._maintenance: threading.Thread | None = None
        #: Milliseconds from fork request to ``Ready`` of the last processes started.
        self.ready_ms: deque[float] = deque(maxlen=1000)
        # Pre-warmed sandboxed templates (container hosts, as root): see _take_spare.
        self._spare_target = settings.spare_templates if sandboxes and self._root else 0
        self._spares: deque[Spare] = deque()
        self._spares_starting = 0
        _say_mechanisms(self.mechanisms())
        if self._spare_target > 0:
            self._spawner.submit(self._refill_spares)

    @classmethod
    def on_this_host(
        cls,
        settings: PoolSettings,
        *,
        template: Template | None = None,
        tenant_info: TenantInfo | None = None,
        cgroup_prefix: str = "patinox",
        cores: CoreAllocator | None = None,
    ) -> PoolSupervisor:
        """A supervisor with what this host can enforce: tenant cgroups under
        ``cgroup_prefix`` where controllers are writable (root), the rest by rlimits
        (:func:`~patinox.isolation.cgroups.rlimits_for`); working directories under
        ``settings.exec_root`` (a size-capped tmpfs each, as root); execution identities
        recorded in ``<exec_root>/.identities.json`` so a restart or a second executing
        process never gives one uid to two tenants.
        """
        support = detect_cgroups()
        cgroups = CgroupManager(support, prefix=cgroup_prefix) if support.controllers else None
        workdirs = Workdirs(settings.exec_root)
        from patinox.isolation.host import detect_host

        sandboxes = settings.spare_templates > 0 and os.geteuid() == 0 and detect_host(cores).container_ok()
        return cls(
            settings=settings,
            sandboxes=sandboxes,
            template=template,
            cgroups=cgroups,
            workdirs=workdirs,
            identities=ExecIdentities(registry=settings.exec_root / ".identities.json"),
            rlimits=lambda limits: rlimits_for(limits, support),
            tenant_info=tenant_info,
            support=support,
            cores=cores,
        )

    def mechanisms(self) -> str:
        """What confines execution processes on this host, in one line."""
        who = (
            "per-tenant uids, no capabilities, no_new_privs"
            if self._root
            else "the host's own uid (not root: no uid change, no size-capped directory)"
        )
        if self.cgroups is None:
            limits = "rlimits only (no writable cgroup controller)"
        else:
            support = self._support
            names = ", ".join(sorted(support.controllers)) if support is not None else "cgroups"
            version = f"cgroup {support.version}" if support is not None else "cgroups"
            limits = f"{version} ({names}) and rlimits"
        return f"execution processes run as {who}; limits by {limits}"

    def pool(
        self, tenant_id: str, limits: ResourceLimits, *, level: IsolationLevel = IsolationLevel.PROCESS
    ) -> TenantPool:
        """The tenant's pool at ``level``, started (and warming up) if it was not; a pool
        at another level is stopped first (the tenant moved).

        Raises:
            PoolStopped: the supervisor was closed.
            IsolationFailed, IsolationUnavailable: its cgroup, directory, identity, sandbox
                or dedicated cores could not be had.
        """
        with self._lock:
            if self._closed.is_set():
                raise PoolStopped("the execution supervisor was closed")
            pool = self._pools.get(tenant_id)
            if pool is not None and not pool.stopped and pool.level is level:
                return pool
        if pool is not None and pool.level is not level:
            self.stop_pool(tenant_id)
        with self._lock:
            pool = self._pools.get(tenant_id)
            if pool is not None and not pool.stopped:
                return pool
            pool = self._new_pool(tenant_id, limits, level)
            self._pools[tenant_id] = pool
            self._start_maintenance()
        if level is IsolationLevel.DEDICATED:
            self.apply_cores()
        pool.template.start()
        pool.warm_up()
        return pool

    def pools(self) -> dict[str, TenantPool]:
        """The pools by tenant id."""
        with self._lock:
            return dict(self._pools)

    def _cpus(self, tenant_id: str, level: IsolationLevel, limits: ResourceLimits) -> tuple[int, ...] | None:
        """The tenant's cpuset: its own cores when ``dedicated``, else the shared ones
        (``None``: no cpuset controller, or nothing dedicated: all the parent's cores)."""
        if level is IsolationLevel.DEDICATED:
            cores = self.cores.reserve(tenant_id, limits.dedicated_cores)
            if self.cgroups is None or not self.cgroups.support.enforces("cpuset"):
                raise IsolationUnavailable(
                    "dedicated cores need a writable cpuset cgroup controller on this host",
                    isolation_level=level.value,
                    tenant_id=tenant_id,
                )
            return cores
        if self.cgroups is None or not self.cgroups.support.enforces("cpuset"):
            return None
        shared = self.cores.shared()
        return None if shared == self.cores.cpus else shared

    def apply_cores(self) -> None:
        """Follow the dedicated reservations: every other tenant's cgroup and this process
        (and the shared template) on the shared cores. Best effort: logged when refused."""
        try:
            shared = self.cores.confine_this_process()
            if self.template.pid is not None:
                os.sched_setaffinity(self.template.pid, shared)
        except (PatinoxError, OSError) as err:
            log.warning("shared cores not applied to this process", error=str(err))
        for tenant_id, pool in self.pools().items():
            if pool.cgroup is None or pool.level is IsolationLevel.DEDICATED:
                continue
            try:
                pool.cgroup.update(pool.limits, cpus=self._cpus(tenant_id, pool.level, pool.limits))
            except (PatinoxError, OSError) as err:
                log.warning("shared cores not applied", tenant_id=tenant_id, error=str(err))

    def _new_pool(self, tenant_id: str, limits: ResourceLimits, level: IsolationLevel) -> TenantPool:
        spare = self._take_spare(tenant_id) if level in SANDBOXED_LEVELS else None
        if spare is not None:
            try:
                return self._bind_spare(spare, tenant_id, limits, level)
            except _START_ERRORS as err:
                log.warning(
                    "a spare template was not bound; starting one", tenant_id=tenant_id, error=str(err)
                )
                self._spawner.submit(self._drop_spare, spare)
        uid, gid = self._identities.for_tenant(tenant_id) if self._root else (None, None)
        cgroup = self._tenant_cgroup(tenant_id, limits, level)
        workdir = self._workdir(tenant_id, limits, uid, gid)
        template = self.template
        if level in SANDBOXED_LEVELS:
            spec = SandboxSpec(
                workdir=workdir,
                uid=os.getuid() if uid is None else uid,
                gid=os.getgid() if gid is None else gid,
            )
            procs = cgroup.child("template").procs_files() if cgroup is not None else ()
            sandboxed = SandboxTemplate(spec, cgroup_procs=procs)
            old = self._templates.pop(tenant_id, None)  # the caller holds the lock
            self._templates[tenant_id] = sandboxed
            if old is not None:
                self._spawner.submit(old.close)
            template = sandboxed
        return self._make_pool(tenant_id, limits, level, template, workdir, uid, gid, cgroup)

    # -- spares ------------------------------------------------------------------------------

    def spares(self) -> list[Spare]:
        """The spare templates now (oldest first), started or starting."""
        with self._lock:
            return list(self._spares)

    def _refill_spares(self) -> None:
        """Start spares until ``spare_templates`` exist (a spawner thread's job)."""
        while True:
            with self._lock:
                if self._closed.is_set() or len(self._spares) + self._spares_starting >= self._spare_target:
                    return
                self._spares_starting += 1
            try:
                spare = self._new_spare()
            except _START_ERRORS as err:
                log.warning("a spare template was not started", error=str(err))
                with self._lock:
                    self._spares_starting -= 1
                return
            with self._lock:
                self._spares_starting -= 1
                kept = not self._closed.is_set()
                if kept:
                    self._spares.append(spare)
            if not kept:
                self._drop_spare(spare)

    def _new_spare(self) -> Spare:
        name = f"spare-{secrets.token_hex(6)}"
        uid, gid = self._identities.for_tenant(name)
        cgroup = None
        try:
            procs: tuple[Path, ...] = ()
            if self.cgroups is not None:
                cpus = self._cpus(name, IsolationLevel.CONTAINER, _SPARE_LIMITS)
                cgroup = self.cgroups.tenant(name, _SPARE_LIMITS, cpus=cpus)
                procs = cgroup.child("template").procs_files()
            workdir = self.workdirs.ensure(name, uid=uid, gid=gid, size_bytes=_SPARE_DISK_BYTES).path
            template = SandboxTemplate(SandboxSpec(workdir=workdir, uid=uid, gid=gid), cgroup_procs=procs)
            template.start()
        except BaseException:
            self._remove_spare(name)
            raise
        return Spare(name, uid, gid, template, cgroup)

    def _drop_spare(self, spare: Spare) -> None:
        """Close an unbound spare and remove its cgroup, directory and uid (best effort)."""
        spare.template.close()
        self._remove_spare(spare.name)

    def _remove_spare(self, name: str) -> None:
        with contextlib.suppress(PatinoxError, OSError):
            if self.cgroups is not None:
                self.cgroups.remove_tenant(name)
        with contextlib.suppress(PatinoxError, OSError):
            self.workdirs.remove(name)
        with contextlib.suppress(PatinoxError, OSError):
            self._identities.release(name)

    def _take_spare(self, tenant_id: str) -> Spare | None:
        """A live spare for a new tenant (the caller holds the lock), and a refill started;
        ``None`` when there is none or the tenant already has a uid or a directory (its
        files are owned by that uid: it gets a template started for it)."""
        if not self._spares or not self._root:
            return None
        if self._identities.known(tenant_id) is not None or self.workdirs.path(tenant_id).exists():
            return None
        spare = None
        for candidate in list(self._spares):  # oldest first; one still being launched waits
            if candidate.template.failed:
                self._spares.remove(candidate)
                self._spawner.submit(self._drop_spare, candidate)
            elif spare is None and candidate.template.launched:
                self._spares.remove(candidate)
                spare = candidate
        if spare is None:
            return None
        if not self._closed.is_set():
            self._spawner.submit(self._refill_spares)
        return spare

    def _tenant_cgroup(
        self, tenant_id: str, limits: ResourceLimits, level: IsolationLevel
    ) -> TenantCgroup | None:
        """The tenant's cgroup with its limits and cores (``None`` without cgroups)."""
        if self.cgroups is None:
            return None
        cgroup = self.cgroups.tenant(tenant_id, limits, cpus=self._cpus(tenant_id, level, limits))
        self._grouped.add(tenant_id)
        return cgroup

    def _make_pool(
        self,
        tenant_id: str,
        limits: ResourceLimits,
        level: IsolationLevel,
        template: Template,
        workdir: Path,
        uid: int | None,
        gid: int | None,
        cgroup: TenantCgroup | None,
    ) -> TenantPool:
        """A pool of the tenant's execution processes from the parts made for it."""
        return TenantPool(
            tenant_id,
            limits,
            level=level,
            template=template,
            spawner=self._spawner,
            settings=self.settings,
            rlimits=self._rlimits(limits),
            workdir=workdir,
            uid=uid,
            gid=gid,
            cgroup=cgroup,
            on_ready=self.ready_ms.append,
        )

    def _bind_spare(
        self, spare: Spare, tenant_id: str, limits: ResourceLimits, level: IsolationLevel
    ) -> TenantPool:
        """Bind ``spare`` to the tenant (class docstring) and make its pool."""
        cgroup = self._tenant_cgroup(tenant_id, limits, level)
        workdir = self.workdirs.adopt(
            tenant_id, spare.name, uid=spare.uid, gid=spare.gid, size_bytes=limits.disk_bytes
        ).path
        uid, gid = self._identities.adopt(tenant_id, spare.name)
        procs: tuple[Path, ...] = ()
        if self.cgroups is not None and cgroup is not None and spare.cgroup is not None:
            target = cgroup.child("template")
            procs = target.procs_files()
            source = spare.cgroup.child("template")
            for _ in range(10):  # the spare's template forks nothing unasked: this settles
                pids = source.pids()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(PatinoxError):  # it exited meanwhile
                        target.attach(pid)
            self.cgroups.remove_tenant(spare.name)
        template = spare.template
        template.rebind(replace(template.spec, workdir=workdir), cgroup_procs=procs)
        old = self._templates.pop(tenant_id, None)  # the caller holds the lock
        self._templates[tenant_id] = template
        if old is not None:
            self._spawner.submit(old.close)
        log.info("spare template bound", tenant_id=tenant_id, spare=spare.name, uid=uid)
        return self._make_pool(tenant_id, limits, level, template, workdir, uid, gid, cgroup)

    def _workdir(self, tenant_id: str, limits: ResourceLimits, uid: int | None, gid: int | None) -> Path:
        return self.workdirs.ensure(
            tenant_id,
            uid=os.getuid() if uid is None else uid,
            gid=os.getgid() if gid is None else gid,
            size_bytes=limits.disk_bytes,
        ).path

    def workdir_full(self, tenant_id: str) -> bool:
        """Whether the tenant's writable directory has no space left (``disk_limit``)."""
        try:
            return self.workdirs.full(tenant_id)
        except (PatinoxError, OSError):
            return False

    def stop_pool(self, tenant_id: str) -> None:
        """Stop the tenant's pool (its processes killed); a later run starts a new one."""
        with self._lock:
            pool = self._pools.pop(tenant_id, None)
            template = self._templates.pop(tenant_id, None)
        if pool is not None:
            pool.stop()
        if template is not None:
            template.close()

    def remove_tenant(self, tenant_id: str) -> None:
        """Stop the pool and remove the tenant's cgroup and directory (a deleted tenant).

        Raises:
            IsolationFailed: the cgroup or the directory could not be removed.
        """
        with self._lock:
            pool = self._pools.pop(tenant_id, None)
            template = self._templates.pop(tenant_id, None)
            self._grouped.discard(tenant_id)
        if pool is not None:
            pool.stop()
            pool.wait_stopped(self.settings.spawn_timeout_s)
        if template is not None:
            template.close()
        if self.cgroups is not None:
            self.cgroups.remove_tenant(tenant_id)
        self.workdirs.remove(tenant_id)
        if self.cores.reserved(tenant_id):
            self.cores.release(tenant_id)
            self.apply_cores()

    def on_tenant_event(self, tenant_id: str, event: str) -> None:
        """Tenant-manager listener (any thread): start a pool when a ``process`` tenant is
        created, follow limit and level updates, stop on suspend/delete, clean up once
        deleted. A pool that fails to start here is logged and started at the first run."""
        if event in ("suspended", "deleting"):
            self.stop_pool(tenant_id)
        elif event == "deleted":
            self.remove_tenant(tenant_id)
        elif event == "created":
            info = self._tenant_info(tenant_id) if self._tenant_info is not None else None
            if info is not None and info[0] in EXECUTION_LEVELS:
                try:
                    self.pool(tenant_id, info[1], level=info[0])
                except _START_ERRORS as err:
                    log.warning("execution pool not started", tenant_id=tenant_id, error=str(err))
        elif event == "updated":
            self._updated(tenant_id)

    def _updated(self, tenant_id: str) -> None:
        with self._lock:
            pool = self._pools.get(tenant_id)
        if pool is None or self._tenant_info is None:
            return
        info = self._tenant_info(tenant_id)
        if info is None or info[0] is not pool.level:
            self.stop_pool(tenant_id)
            return
        limits = info[1]
        if pool.cgroup is not None:
            pool.cgroup.update(limits, cpus=self._cpus(tenant_id, pool.level, limits))
        self._workdir(tenant_id, limits, pool.uid, pool.gid)
        pool.update(limits, self._rlimits(limits))

    def _start_maintenance(self) -> None:
        if self._maintenance is None:
            self._maintenance = threading.Thread(target=self._maintain, name="patinox-pools", daemon=True)
            self._maintenance.start()

    def _maintain(self) -> None:
        """Scale pools idle for ``idle_s`` to zero, until closed."""
        while not self._closed.wait(self.settings.maintenance_s):
            now = time.monotonic()
            for tenant_id, pool in self.pools().items():
                idle = pool.idle_for(now)
                if idle is not None and idle >= self.settings.idle_s:
                    stopped = pool.scale_to_zero()
                    if stopped:
                        log.info("execution pool scaled to zero", tenant_id=tenant_id, processes=stopped)

    def close(self) -> None:
        """Stop every pool and the template (when it is this supervisor's own), and remove
        the cgroups it made (the tenants' directories stay: their files outlive this
        process). Idempotent."""
        with self._lock:
            self._closed.set()
            pools, self._pools = list(self._pools.values()), {}
            templates, self._templates = list(self._templates.values()), {}
            grouped, self._grouped = set(self._grouped), set()
            spares, self._spares = list(self._spares), deque()
        for pool in pools:
            pool.stop()
        for template in templates:
            template.close()
        for spare in spares:
            self._drop_spare(spare)
        self.cores.unconfine()
        if self._owns_template:
            self.template.close()
        for pool in pools:
            pool.wait_stopped(self.settings.spawn_timeout_s)
        self._spawner.shutdown(wait=True, cancel_futures=True)
        if self.cgroups is not None:
            for tenant_id in grouped:
                try:
                    self.cgroups.remove_tenant(tenant_id)
                except (PatinoxError, OSError) as err:
                    log.warning("a tenant's cgroup was not removed", tenant_id=tenant_id, error=str(err))
