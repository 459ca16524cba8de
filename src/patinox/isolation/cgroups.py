"""Per-tenant cgroups: the groups, their limits and accounting.

One group per tenant, ``<prefix>/<tenant_id>``, in every cgroup hierarchy that carries a
controller Patinox uses (``memory``, ``cpu``, ``cpuacct``, ``pids``, ``cpuset``), and one
child group per execution process below it: ``<prefix>/<tenant_id>/<name>``. Limits sit on
the tenant's group (so all its execution processes share them), accounting is read per child
(one run at a time runs in one execution process) or per tenant.

Both cgroup versions are handled, per controller: cgroup v1, cgroup v2 (controllers enabled
in ``cgroup.subtree_control`` down the path; processes only in leaves) and hybrid hosts, as
found by :func:`~patinox.isolation.cgroup_support.detect_cgroups` (re-exported here with
the rest of what the host supports: :class:`CgroupSupport`, :func:`rlimits_for`...).

Everything fails closed: a limit that cannot be written raises :class:`IsolationFailed`
(the ``OSError`` chained, its path in the fields); an OS error never reaches the caller
raw. A controller the host does not give Patinox is reported by :meth:`CgroupSupport.checks`
(``patinox doctor``) and replaced where possible by an rlimit (:func:`rlimits_for`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import threading
import time
from pathlib import Path, PurePosixPath

from patinox.errors import ConfigurationError, IsolationFailed, IsolationUnavailable
from patinox.isolation.cgroup_support import (
    CONTROLLERS,
    CgroupSupport,
    CgroupVersion,
    Hierarchy,
    cpus_text,
    detect_cgroups,
    parse_cpus,
    rlimits_for,
)
from patinox.isolation.checks import Check
from patinox.tenancy.plans import ResourceLimits

__all__ = [
    "CONTROLLERS",
    "CgroupCounters",
    "CgroupManager",
    "CgroupSupport",
    "CgroupVersion",
    "Check",
    "Hierarchy",
    "ProcessCgroup",
    "TenantCgroup",
    "cpus_text",
    "detect_cgroups",
    "parse_cpus",
    "rlimits_for",
]

#: CFS period written with every CPU quota, microseconds (the kernel's default).
CFS_PERIOD_US = 100_000
_MIN_QUOTA_US = 1_000  # the kernel refuses a smaller cfs quota
_KILL_DEADLINE_S = 10.0  # a guard against a group that never empties, not a timing
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise IsolationFailed.from_os_error("read", path, err) from err


def _write(path: Path, value: str) -> None:
    """One ``write(2)`` of ``value`` (cgroup files take one value per write)."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise IsolationFailed.from_os_error(f"write {value.strip()!r} to", path, err) from err


def _keyed(text: str, key: str) -> int | None:
    """The value of ``key`` in a ``key value`` per line file (``cpu.stat``, ``memory.events``)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


# --- groups -----------------------------------------------------------------------------


def _check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"{kind} {name!r} cannot name a cgroup: letters, digits, '_' and '-', at most 128"
        )
    return name


class _Tree:
    """The groups under one prefix in every hierarchy a manager uses (shared by its
    tenant and process groups). ``rel`` paths are relative to each hierarchy's mount."""

    def __init__(self, support: CgroupSupport, prefix: PurePosixPath) -> None:
        self.support = support
        self.prefix = prefix
        used: dict[Hierarchy, set[str]] = {}
        for controller in sorted(support.controllers):
            hierarchy = support.hierarchy_of(controller)
            if hierarchy is not None:
                used.setdefault(hierarchy, set()).add(controller)
        self.used = {h: frozenset(cs) for h, cs in used.items()}
        self.lock = threading.Lock()
        self.removed_oom_kills: dict[str, int] = {}
        self.peak_fds: dict[PurePosixPath, int] = {}
        self.peak_samples: dict[PurePosixPath, int] = {}

    def enforces(self, controller: str) -> bool:
        return controller in self.support.controllers

    def require(self, controller: str, what: str) -> Hierarchy:
        hierarchy = self.support.hierarchy_of(controller)
        if hierarchy is None or not self.enforces(controller):
            raise IsolationUnavailable(
                f"{what} needs the cgroup {controller} controller, which this host does not give "
                "Patinox (see patinox doctor)",
                mechanism=f"cgroup {controller} controller",
            )
        return hierarchy

    def path(self, controller: str, rel: PurePosixPath) -> Path:
        return self.require(controller, f"cgroup {controller} files").mount / rel

    def dirs(self, rel: PurePosixPath) -> list[Path]:
        return [h.mount / rel for h in self.used]

    # creation ------------------------------------------------------------------------

    def create(self, rel: PurePosixPath) -> None:
        """Make ``rel`` (and the groups above it) in every used hierarchy."""
        for hierarchy, controllers in self.used.items():
            here = hierarchy.mount
            for part in rel.parts:
                if hierarchy.version == "v2":
                    self._enable(here, controllers)
                here = here / part
                self._mkdir(here)
                if hierarchy.version == "v1" and "cpuset" in controllers:
                    self._fill_cpuset(here)

    def _mkdir(self, path: Path) -> None:
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as err:
            raise IsolationFailed.from_os_error("create the cgroup", path, err) from err

    def _enable(self, path: Path, controllers: frozenset[str]) -> None:
        """v2: the controllers on in ``path``'s children (``cgroup.subtree_control``).

        Fails with EBUSY where ``path`` holds processes ("no internal processes")."""
        wanted = sorted(controllers - {"cpuacct"})
        enabled = set(_read(path / "cgroup.subtree_control").split())
        for controller in wanted:
            if controller in enabled:
                continue
            try:
                _write(path / "cgroup.subtree_control", f"+{controller}")
            except IsolationFailed as err:
                if err.errno_name != "EBUSY":
                    raise
                raise IsolationFailed(
                    f"cannot enable {controller} below {path}: it holds processes, and cgroup v2 "
                    "allows processes only in leaf groups (move them into a child group)",
                    **err.fields,
                ) from err.__cause__

    def _fill_cpuset(self, path: Path) -> None:
        """v1: a new cpuset group is empty and takes no process until filled: copy its parent's."""
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not _read(path / name).strip():
                _write(path / name, _read(path.parent / name).strip() or "\n")

    # limits --------------------------------------------------------------------------

    def apply(self, rel: PurePosixPath, limits: ResourceLimits, cpus: tuple[int, ...] | None) -> None:
        if cpus is not None:
            self.require("cpuset", f"pinning to CPUs {cpus_text(cpus)}")
            if not cpus:
                raise ConfigurationError("cpus, when given, names at least one CPU")
        if self.enforces("memory"):
            self._memory(rel, limits.exec_memory_bytes)
        if self.enforces("cpu"):
            self._cpu(rel, limits.cpu_weight, limits.cpu_quota_cores)
        if self.enforces("pids"):
            _write(self.path("pids", rel) / "pids.max", str(limits.max_processes))
        if self.enforces("cpuset"):
            self._cpuset(rel, cpus)

    def _memory(self, rel: PurePosixPath, limit: int) -> None:
        hierarchy = self.require("memory", "a memory limit")
        group = hierarchy.mount / rel
        if hierarchy.version == "v2":
            _write(group / "memory.max", str(limit))
            if (group / "memory.swap.max").exists():
                _write(group / "memory.swap.max", "0")
            return
        # v1: memory+swap (memsw, when swap accounting is on) must stay >= memory, so the
        # larger of the two moves first; equal values leave no swap to dodge the limit.
        memsw = group / "memory.memsw.limit_in_bytes"
        files = [group / "memory.limit_in_bytes"]
        if memsw.exists():
            current = int(_read(files[0]))
            files = [memsw, files[0]] if limit >= current else [files[0], memsw]
        for path in files:
            _write(path, str(limit))

    def _cpu(self, rel: PurePosixPath, weight: int, quota_cores: float | None) -> None:
        hierarchy = self.require("cpu", "a CPU weight")
        group = hierarchy.mount / rel
        quota = None if quota_cores is None else max(_MIN_QUOTA_US, round(quota_cores * CFS_PERIOD_US))
        if hierarchy.version == "v2":
            _write(group / "cpu.weight", str(weight))
            _write(group / "cpu.max", f"{'max' if quota is None else quota} {CFS_PERIOD_US}")
            return
        _write(group / "cpu.shares", str(max(2, weight * 1024 // 100)))
        _write(group / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(group / "cpu.cfs_quota_us", str(-1 if quota is None else quota))

    def _cpuset(self, rel: PurePosixPath, cpus: tuple[int, ...] | None) -> None:
        hierarchy = self.require("cpuset", "a cpuset")
        group = hierarchy.mount / rel
        if hierarchy.version == "v2":
            _write(group / "cpuset.cpus", cpus_text(cpus) if cpus else "\n")
            return
        target = cpus_text(cpus) if cpus else _read(group.parent / "cpuset.cpus").strip()
        children = self.children_dirs(group)
        if children:
            # v1: a child's cpus must stay within its parent's: widen the parent to both
            # sets, move the children, then narrow the parent.
            old = parse_cpus(_read(group / "cpuset.cpus"))
            _write(group / "cpuset.cpus", cpus_text({*old, *parse_cpus(target)}))
            for child in children:
                _write(child / "cpuset.cpus", target)
        _write(group / "cpuset.cpus", target)

    @staticmethod
    def children_dirs(group: Path) -> list[Path]:
        try:
            return sorted(p for p in group.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as err:
            raise IsolationFailed.from_os_error("list", group, err) from err

    # accounting ----------------------------------------------------------------------

    def cpu_seconds(self, rel: PurePosixPath) -> float:
        hierarchy = self.require("cpuacct", "CPU accounting")
        if hierarchy.version == "v2":
            usage = _keyed(_read(hierarchy.mount / rel / "cpu.stat"), "usage_usec")
            return (usage or 0) / 1e6
        return int(_read(hierarchy.mount / rel / "cpuacct.usage")) / 1e9

    def local_oom_kills(self, rel: PurePosixPath) -> int:
        """OOM kills of processes that were in ``rel`` itself (not its children)."""
        hierarchy = self.require("memory", "OOM accounting")
        group = hierarchy.mount / rel
        if hierarchy.version == "v2":
            local = group / "memory.events.local"
            text = _read(local if local.exists() else group / "memory.events")
        else:
            text = _read(group / "memory.oom_control")
        return _keyed(text, "oom_kill") or 0

    def memory_peak(self, rel: PurePosixPath) -> int:
        hierarchy = self.require("memory", "memory accounting")
        group = hierarchy.mount / rel
        if hierarchy.version == "v1":
            return int(_read(group / "memory.max_usage_in_bytes"))
        fd = self.peak_fds.get(rel)
        if fd is not None:  # v2, Linux >= 6.12: the peak since this fd's reset
            try:
                return int(os.pread(fd, 64, 0))
            except OSError as err:
                raise IsolationFailed.from_os_error("read", group / "memory.peak", err) from err
        if (group / "memory.peak").exists() and rel not in self.peak_samples:
            return int(_read(group / "memory.peak"))
        # No resettable peak: the largest memory.current seen by these calls since the reset.
        sample = max(int(_read(group / "memory.current")), self.peak_samples.get(rel, 0))
        self.peak_samples[rel] = sample
        return sample

    def reset_peak(self, rel: PurePosixPath) -> None:
        hierarchy = self.require("memory", "memory accounting")
        group = hierarchy.mount / rel
        if hierarchy.version == "v1":
            _write(group / "memory.max_usage_in_bytes", "0")
            return
        self.close_peak(rel)
        self.peak_samples.pop(rel, None)
        try:
            fd = os.open(group / "memory.peak", os.O_RDWR)
        except OSError:
            self.peak_samples[rel] = 0  # no memory.peak, or read-only (before Linux 6.12)
            return
        try:
            os.write(fd, b"reset\n")
        except OSError:
            os.close(fd)
            self.peak_samples[rel] = 0
            return
        self.peak_fds[rel] = fd

    def close_peak(self, rel: PurePosixPath) -> None:
        fd = self.peak_fds.pop(rel, None)
        if fd is not None:
            os.close(fd)

    # processes -----------------------------------------------------------------------

    def pids(self, rel: PurePosixPath) -> set[int]:
        pids: set[int] = set()
        for group in self.dirs(rel):
            try:
                text = (group / "cgroup.procs").read_text()
            except OSError as err:
                if isinstance(err, FileNotFoundError) or err.errno == errno.ENODEV:
                    continue  # the group was removed meanwhile (ENODEV: while being read)
                raise IsolationFailed.from_os_error("read", group / "cgroup.procs", err) from err
            pids.update(int(p) for p in text.split())
        return pids

    def attach(self, rel: PurePosixPath, pid: int) -> None:
        for group in self.dirs(rel):
            _write(group / "cgroup.procs", str(pid))

    def kill(self, rel: PurePosixPath) -> None:
        """SIGKILL everything in ``rel`` (and below it), again until it is empty."""
        deadline = time.monotonic() + _KILL_DEADLINE_S
        while pids := self.pids_below(rel):
            if os.getpid() in pids:
                raise ConfigurationError(f"refusing to kill the calling process: it is in cgroup {rel}")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                except OSError as err:
                    raise IsolationFailed.from_os_error(f"kill pid {pid} in", self.dirs(rel)[0], err) from err
            if time.monotonic() > deadline:
                raise IsolationFailed(
                    f"processes {sorted(pids)} still in cgroup {rel} after SIGKILL",
                    path=str(rel),
                    operation="kill",
                )
            time.sleep(0.005)

    def pids_below(self, rel: PurePosixPath) -> set[int]:
        pids = self.pids(rel)
        for group in self.dirs(rel)[:1]:
            for child in self.children_dirs(group):
                pids |= self.pids_below(rel / child.name)
        return pids

    def rmdir(self, rel: PurePosixPath) -> None:
        """Remove ``rel`` in every hierarchy (already gone is fine); its children first."""
        self.close_peak(rel)
        self.peak_samples.pop(rel, None)
        deadline = time.monotonic() + _KILL_DEADLINE_S
        for group in self.dirs(rel):
            for child in self.children_dirs(group):
                self.rmdir(rel / child.name)
            while True:
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    # EBUSY: a killed process has not finished exiting yet.
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise IsolationFailed.from_os_error("remove the cgroup", group, err) from err
                    time.sleep(0.005)


class ProcessCgroup:
    """The group of one execution process, ``<prefix>/<tenant_id>/<name>``, below its
    tenant's (made by :meth:`TenantCgroup.child`). Leaves only: processes live here."""

    def __init__(self, tree: _Tree, tenant_id: str, name: str) -> None:
        self._tree = tree
        self.tenant_id = tenant_id
        self.name = name
        self._rel = tree.prefix / tenant_id / name

    def __repr__(self) -> str:
        return f"ProcessCgroup({self.tenant_id!r}, {self.name!r})"

    def procs_files(self) -> tuple[Path, ...]:
        """The ``cgroup.procs`` files, one per hierarchy, that a process writes its own pid
        into (a freshly forked child, still root) to enter this group everywhere."""
        return tuple(group / "cgroup.procs" for group in self._tree.dirs(self._rel))

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this group in every hierarchy.

        Raises:
            IsolationFailed: a write was refused (no such process, cpuset not filled...).
        """
        self._tree.attach(self._rel, pid)

    def cpu_seconds(self) -> float:
        """CPU time used by everything that ran in this group since it was made, seconds.

        Raises:
            IsolationUnavailable: no CPU accounting here (``support.enforces("cpuacct")``).
        """
        return self._tree.cpu_seconds(self._rel)

    def memory_peak_bytes(self) -> int:
        """Highest memory use since the last :meth:`reset_peak` (since creation before one),
        bytes: v1 ``memory.max_usage_in_bytes``; v2 ``memory.peak`` (reset per open file,
        Linux >= 6.12), else the largest ``memory.current`` these calls sampled.

        Raises:
            IsolationUnavailable: the memory controller is not enforced here.
        """
        return self._tree.memory_peak(self._rel)

    def reset_peak(self) -> None:
        """Start a new peak (call it before each run)."""
        self._tree.reset_peak(self._rel)

    def oom_kills(self) -> int:
        """Processes of this group killed by the OOM killer so far."""
        return self._tree.local_oom_kills(self._rel)

    def pids(self) -> list[int]:
        """The processes in this group (thread group ids), sorted."""
        return sorted(self._tree.pids(self._rel))

    def counters(self) -> CgroupCounters:
        """This group's accounting files opened once, read at each run (see
        :class:`CgroupCounters`). Close it when the process is let go."""
        return CgroupCounters(self._tree, self._rel)

    def kill(self) -> None:
        """SIGKILL every process in this group, again until none is left.

        Raises:
            IsolationFailed: a kill was refused, or the group did not empty in 10 s.
        """
        self._tree.kill(self._rel)

    def remove(self) -> None:
        """Kill what is left, then remove the group everywhere; its OOM kills stay counted
        in its tenant's :meth:`TenantCgroup.oom_kills`. Already removed is fine."""
        self.kill()
        kills = self.oom_kills() if self._tree.enforces("memory") and self._exists() else 0
        self._tree.rmdir(self._rel)
        with self._tree.lock:
            removed = self._tree.removed_oom_kills
            removed[self.tenant_id] = removed.get(self.tenant_id, 0) + kills

    def _exists(self) -> bool:
        return any(group.is_dir() for group in self._tree.dirs(self._rel))


class CgroupCounters:
    """One process group's accounting, read through descriptors kept open (made by
    :meth:`ProcessCgroup.counters`): a ``pread`` of a kept descriptor costs about a
    microsecond, an ``open``/``read``/``close`` of the path about a hundred, and the host
    reads these at every run. Each file is opened at first use; a controller the host does
    not enforce raises :class:`IsolationUnavailable` as :class:`ProcessCgroup` does. Once
    the group is removed a read fails (``ENODEV``: :class:`IsolationFailed`).

    cgroup v1: ``cpuacct.usage``, ``memory.max_usage_in_bytes`` (read, and reset by writing
    ``0`` to the same descriptor), ``memory.oom_control``. cgroup v2: ``cpu.stat`` and
    ``memory.events.local`` (``memory.events`` before Linux 5.13); the peak as
    :meth:`ProcessCgroup.memory_peak_bytes` (``memory.peak`` is reset per open file there).
    """

    __slots__ = ("_files", "_rel", "_tree")

    def __init__(self, tree: _Tree, rel: PurePosixPath) -> None:
        self._tree = tree
        self._rel = rel
        self._files: dict[str, tuple[int, Path]] = {}

    def _file(self, controller: str, what: str, name: str, flags: int = os.O_RDONLY) -> tuple[int, Path]:
        """``name``'s kept descriptor and path (opened now if it was not)."""
        kept = self._files.get(name)
        if kept is not None:
            return kept
        path = self._tree.require(controller, what).mount / self._rel / name
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as err:
            raise IsolationFailed.from_os_error("open", path, err) from err
        self._files[name] = (fd, path)
        return fd, path

    @staticmethod
    def _pread(kept: tuple[int, Path], size: int = 4096) -> bytes:
        try:
            return os.pread(kept[0], size, 0)
        except OSError as err:
            raise IsolationFailed.from_os_error("read", kept[1], err) from err

    def _v1(self, controller: str, what: str) -> bool:
        return self._tree.require(controller, what).version == "v1"

    def cpu_seconds(self) -> float:
        """As :meth:`ProcessCgroup.cpu_seconds`, seconds."""
        kept = self._files.get("cpuacct.usage") or self._files.get("cpu.stat")
        if kept is None:
            v1 = self._v1("cpuacct", "CPU accounting")
            kept = self._file("cpuacct", "CPU accounting", "cpuacct.usage" if v1 else "cpu.stat")
        if kept[1].name == "cpuacct.usage":
            return int(self._pread(kept, 64)) / 1e9
        return (_keyed(self._pread(kept).decode(), "usage_usec") or 0) / 1e6

    def _v1_peak(self) -> tuple[int, Path] | None:
        """v1's ``memory.max_usage_in_bytes`` (read and reset), ``None`` on v2."""
        kept = self._files.get("memory.max_usage_in_bytes")
        if kept is None and self._v1("memory", "memory accounting"):
            kept = self._file("memory", "memory accounting", "memory.max_usage_in_bytes", os.O_RDWR)
        return kept

    def memory_peak_bytes(self) -> int:
        """As :meth:`ProcessCgroup.memory_peak_bytes`, bytes."""
        kept = self._v1_peak()
        if kept is None:
            return self._tree.memory_peak(self._rel)
        return int(self._pread(kept, 64))

    def reset_peak(self) -> None:
        """As :meth:`ProcessCgroup.reset_peak`."""
        kept = self._v1_peak()
        if kept is None:
            self._tree.reset_peak(self._rel)
            return
        try:
            os.pwrite(kept[0], b"0", 0)
        except OSError as err:
            raise IsolationFailed.from_os_error("write '0' to", kept[1], err) from err

    def oom_kills(self) -> int:
        """As :meth:`ProcessCgroup.oom_kills`."""
        kept = (
            self._files.get("memory.oom_control")
            or self._files.get("memory.events.local")
            or self._files.get("memory.events")
        )
        if kept is None:
            hierarchy = self._tree.require("memory", "OOM accounting")
            if hierarchy.version == "v1":
                name = "memory.oom_control"
            elif (hierarchy.mount / self._rel / "memory.events.local").exists():
                name = "memory.events.local"
            else:
                name = "memory.events"
            kept = self._file("memory", "OOM accounting", name)
        return _keyed(self._pread(kept).decode(), "oom_kill") or 0

    def close(self) -> None:
        """Close the descriptors (idempotent; a later read opens them again)."""
        files, self._files = list(self._files.values()), {}
        for fd, _ in files:
            with contextlib.suppress(OSError):
                os.close(fd)


class TenantCgroup:
    """A tenant's group, ``<prefix>/<tenant_id>``: the tenant's limits, its processes'
    groups below it (made by :meth:`CgroupManager.tenant`)."""

    def __init__(self, tree: _Tree, tenant_id: str) -> None:
        self._tree = tree
        self.tenant_id = tenant_id
        self._rel = tree.prefix / tenant_id

    def __repr__(self) -> str:
        return f"TenantCgroup({self.tenant_id!r})"

    def update(self, limits: ResourceLimits, *, cpus: tuple[int, ...] | None = None) -> None:
        """Write ``limits`` to the tenant's group: memory ``exec_memory_bytes`` (swap off
        where the host accounts it), CPU ``cpu_weight`` and ``cpu_quota_cores``, pids
        ``max_processes``, and with ``cpus`` the CPUs its processes may run on (``None``:
        its parent's, i.e. no pinning). Controllers the host does not give are left to the
        rlimits (:func:`rlimits_for`).

        Raises:
            IsolationUnavailable: ``cpus`` given without a cpuset controller.
            IsolationFailed: a limit could not be written (e.g. memory below current use).
        """
        self._tree.apply(self._rel, limits, cpus)

    def child(self, name: str) -> ProcessCgroup:
        """The group for one execution process, created (or found) below this tenant's.

        Raises:
            ConfigurationError: ``name`` is not a plain name.
            IsolationFailed: the group could not be made.
        """
        child = ProcessCgroup(self._tree, self.tenant_id, _check_name("process group", name))
        self._tree.create(self._rel / name)
        return child

    def children(self) -> list[ProcessCgroup]:
        """The process groups below this tenant's that exist now."""
        names: set[str] = set()
        for group in self._tree.dirs(self._rel):
            names.update(c.name for c in self._tree.children_dirs(group))
        return [ProcessCgroup(self._tree, self.tenant_id, n) for n in sorted(names)]

    def oom_kills(self) -> int:
        """OOM kills so far among the tenant's processes: in its group, in its process
        groups, and in process groups removed by this manager."""
        total = self._tree.local_oom_kills(self._rel)
        total += sum(c.oom_kills() for c in self.children())
        with self._tree.lock:
            return total + self._tree.removed_oom_kills.get(self.tenant_id, 0)

    def cpu_seconds(self) -> float:
        """CPU time used by all the tenant's processes, seconds (removed groups included)."""
        return self._tree.cpu_seconds(self._rel)

    def pids(self) -> list[int]:
        """Every process in the tenant's group or below it, sorted."""
        return sorted(self._tree.pids_below(self._rel))

    def procs_files(self) -> tuple[Path, ...]:
        """The tenant group's own ``cgroup.procs`` files. Not normally needed: processes
        belong in :meth:`child` groups (cgroup v2 refuses them here once children exist)."""
        return tuple(group / "cgroup.procs" for group in self._tree.dirs(self._rel))


class CgroupManager:
    """The tenants' groups under ``<prefix>`` in each hierarchy ``support`` allows.

    Args:
        support: from :func:`detect_cgroups`; only its writable controllers are used.
        prefix: the groups' parent, relative to each hierarchy's root (``patinox``, or a
            path such as ``system.slice/patinox.service/tenants`` on a delegated subtree).

    Raises:
        ConfigurationError: ``prefix`` is absolute, empty or climbs (``..``).
    """

    def __init__(self, support: CgroupSupport, *, prefix: str = "patinox") -> None:
        rel = PurePosixPath(prefix)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts or "." in prefix.split("/"):
            raise ConfigurationError(f"cgroup prefix {prefix!r} must be a relative path below the root")
        self.support = support
        self._tree = _Tree(support, rel)

    @property
    def prefix(self) -> str:
        return str(self._tree.prefix)

    def group_dirs(self) -> tuple[Path, ...]:
        """``<mount>/<prefix>`` in each hierarchy used (where the tenants' groups go)."""
        return tuple(self._tree.dirs(self._tree.prefix))

    def tenant(
        self, tenant_id: str, limits: ResourceLimits, *, cpus: tuple[int, ...] | None = None
    ) -> TenantCgroup:
        """The tenant's group with ``limits`` applied (created, or updated: idempotent).

        Raises:
            ConfigurationError: ``tenant_id`` cannot name a directory.
            IsolationUnavailable: ``cpus`` given without a cpuset controller.
            IsolationFailed: a group or limit could not be made or written.
        """
        group = TenantCgroup(self._tree, _check_name("tenant id", tenant_id))
        self._tree.create(self._tree.prefix / tenant_id)
        group.update(limits, cpus=cpus)
        return group

    def tenants(self) -> list[str]:
        """Tenant ids that have a group under the prefix now."""
        names: set[str] = set()
        for group in self._tree.dirs(self._tree.prefix):
            names.update(c.name for c in self._tree.children_dirs(group))
        return sorted(names)

    def remove_tenant(self, tenant_id: str) -> None:
        """Kill every process left in the tenant's groups, then remove them (process groups
        first). Already removed is fine.

        Raises:
            IsolationFailed: a process could not be killed or a group removed.
        """
        rel = self._tree.prefix / _check_name("tenant id", tenant_id)
        self._tree.kill(rel)
        self._tree.rmdir(rel)
        with self._tree.lock:
            self._tree.removed_oom_kills.pop(tenant_id, None)

    def remove_all(self) -> None:
        """Remove every tenant's groups and the prefix group itself (tests, uninstall)."""
        for tenant_id in self.tenants():
            self.remove_tenant(tenant_id)
        self._tree.rmdir(self._tree.prefix)
