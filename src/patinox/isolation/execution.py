"""The host's handle on one warm execution process, and its per-run accounting.

:class:`ExecutionProcess` is what a :class:`~patinox.isolation.pool.TenantPool` keeps of
each process it started: its channel, its exit status (reported by the template's thread),
its own cgroup, and the accounting the host reads at every run: CPU seconds, peak memory
and OOM kills from the process's cgroup where the host has cgroups (read through
descriptors kept open, :class:`~patinox.isolation.cgroups.CgroupCounters`), else from its
``/proc`` files (also kept open). Killing goes through the template, which kills only a
child it has not reaped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Callable

import structlog

from patinox.errors import PatinoxError
from patinox.isolation.cgroups import CgroupCounters, ProcessCgroup
from patinox.isolation.channel import HostChannel
from patinox.isolation.template import Template

__all__ = ["ExecutionProcess", "resolve_waiter"]

log = structlog.get_logger("patinox.isolation")


def resolve_waiter(waiter: asyncio.Future[None]) -> None:
    """Resolve ``waiter`` unless it is already done (cancelled by its waiter, or resolved)."""
    if not waiter.done():
        waiter.set_result(None)


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
                watcher.get_loop().call_soon_threadsafe(resolve_waiter, watcher)

    def exit_watch(self) -> asyncio.Future[None]:
        """A future of the running loop resolved once the process exits (give it back with
        :meth:`unwatch`). Cancelling it leaves :attr:`exit` alone."""
        watcher: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watchers.add(watcher)
        if self.exit.done():
            resolve_waiter(watcher)
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
