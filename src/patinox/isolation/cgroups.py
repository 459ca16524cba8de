"""Per-tenant cgroups: what this host can enforce, the groups, their limits and accounting.

One group per tenant, ``<prefix>/<tenant_id>``, in every cgroup hierarchy that carries a
controller Patinox uses (``memory``, ``cpu``, ``cpuacct``, ``pids``, ``cpuset``), and one
child group per execution process below it: ``<prefix>/<tenant_id>/<name>``. Limits sit on
the tenant's group (so all its execution processes share them), accounting is read per child
(one run at a time runs in one execution process) or per tenant.

Both cgroup versions are handled, per controller: cgroup v1 (one mount per controller or per
co-mounted set, found in ``/proc/self/mountinfo``), cgroup v2 (the unified hierarchy,
controllers enabled in ``cgroup.subtree_control`` down the path; processes only in leaves)
and hybrid hosts (v1 controllers beside a v2 mount that carries none or a few of them).

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
import resource
import secrets
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from patinox.errors import ConfigurationError, IsolationFailed, IsolationUnavailable
from patinox.isolation.checks import Check
from patinox.isolation.workdir import probe_tmpfs
from patinox.tenancy.plans import ResourceLimits

__all__ = [
    "CONTROLLERS",
    "CgroupCounters",
    "CgroupManager",
    "CgroupSupport",
    "Check",
    "Hierarchy",
    "ProcessCgroup",
    "TenantCgroup",
    "cpus_text",
    "detect_cgroups",
    "parse_cpus",
    "rlimits_for",
]

#: The controllers Patinox uses, in the order ``patinox doctor`` lists them.
CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "cpuacct", "pids", "cpuset")

CgroupVersion = Literal["v1", "v2"]

#: CFS period written with every CPU quota, microseconds (the kernel's default).
CFS_PERIOD_US = 100_000
_MIN_QUOTA_US = 1_000  # the kernel refuses a smaller cfs quota
_KILL_DEADLINE_S = 10.0  # a guard against a group that never empties, not a timing
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


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


def parse_cpus(text: str) -> tuple[int, ...]:
    """CPU numbers of a kernel cpu list (``"0-2,5"`` -> ``(0, 1, 2, 5)``), sorted."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return tuple(sorted(cpus))


def cpus_text(cpus: Iterable[int]) -> str:
    """A kernel cpu list for ``cpus`` (``(0, 1, 2, 5)`` -> ``"0-2,5"``)."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


# --- detection --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Hierarchy:
    """One mounted cgroup hierarchy.

    Attributes:
        version: ``"v1"`` (a ``cgroup`` mount) or ``"v2"`` (the unified ``cgroup2`` mount).
        mount: where it is mounted (``/sys/fs/cgroup/memory``, ``/sys/fs/cgroup``).
        controllers: which of :data:`CONTROLLERS` it carries: v1 the mount options, v2 the
            root's ``cgroup.controllers`` (plus ``cpuacct``: v2's ``cpu.stat`` always counts).
        writable: whether this process could create (and remove) a group in it.
        error: why not, when not writable (the ``OSError`` text).
        fix: what to do about it, when the cause says more than "not root".
    """

    version: CgroupVersion
    mount: Path
    controllers: frozenset[str]
    writable: bool
    error: str | None = None
    fix: str | None = None


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts(mountinfo: str, root: Path) -> Iterator[tuple[CgroupVersion, Path, frozenset[str]]]:
    """(version, mount point, v1 controllers from the mount options) of each cgroup mount
    at or under ``root``, in mountinfo order."""
    seen: set[Path] = set()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        mount = Path(_unescape(fields[4]))
        if tail[0] not in ("cgroup", "cgroup2") or mount in seen or not mount.is_relative_to(root):
            continue
        seen.add(mount)
        if tail[0] == "cgroup2":
            yield "v2", mount, frozenset()
        else:
            yield "v1", mount, frozenset(tail[2].split(",")) & frozenset(CONTROLLERS)


def _probe(mount: Path) -> str | None:
    """Create and remove a probe group under ``mount``; ``None`` when that worked."""
    probe = mount / f"patinox-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as err:
        return f"{err.strerror or err} ({probe.parent})"
    try:
        probe.rmdir()
    except OSError as err:
        return f"created {probe} but could not remove it: {err.strerror or err}"
    return None


def _v2_controllers(mount: Path) -> frozenset[str]:
    try:
        available = set((mount / "cgroup.controllers").read_text().split())
    except OSError:
        available = set()
    # ``cpu.stat`` (usage_usec) is in every v2 group, with or without the cpu controller.
    return frozenset(available & set(CONTROLLERS)) | {"cpuacct"}


def _v2_busy_root(mount: Path) -> str | None:
    """Why the controllers of a v2 mount cannot be handed down, if they cannot: a cgroup
    namespace root (a container's) that holds processes ("no internal processes")."""
    try:
        if not (mount / "cgroup.type").exists():
            return None  # the real root is exempt
        busy = (mount / "cgroup.procs").read_text().split()
        enabled = (mount / "cgroup.subtree_control").read_text().split()
    except OSError as err:
        return f"{err.strerror or err} ({mount})"
    if busy and not enabled:
        return (
            f"processes {', '.join(busy[:5])} sit in {mount}, and cgroup v2 gives no controller "
            "to the children of a group with processes"
        )
    return None


def _hierarchies(root: Path, mountinfo: str) -> list[Hierarchy]:
    found: list[Hierarchy] = []
    for version, mount, v1_controllers in _cgroup_mounts(mountinfo, root):
        controllers = _v2_controllers(mount) if version == "v2" else v1_controllers
        if not controllers:
            continue  # name=systemd, devices, freezer...: nothing Patinox uses
        error, fix = _probe(mount), None
        if error is None and version == "v2" and (busy := _v2_busy_root(mount)) is not None:
            error, fix = (
                busy,
                "start Patinox in a leaf group of the namespace (e.g. <root>/init) or under systemd",
            )
        found.append(
            Hierarchy(
                version=version,
                mount=mount,
                controllers=controllers,
                writable=error is None,
                error=error,
                fix=fix,
            )
        )
    # A controller is bound to one hierarchy; cpuacct may be both a v1 mount and v2's
    # cpu.stat: the v1 mount comes first and wins.
    return sorted(found, key=lambda h: h.version)


def _root_fix(running_as_root: bool) -> str:
    if running_as_root:
        return (
            "the cgroup file system is read-only here (a container): give it a writable "
            "cgroup namespace (docker run --cgroupns=private with a writable /sys/fs/cgroup, "
            "or a delegated subtree)"
        )
    return (
        "run Patinox as root, or delegate a cgroup subtree to its user "
        "(systemd: Delegate=yes in the unit, then point the prefix into it)"
    )


def _controller_line(
    controller: str, hierarchy: Hierarchy | None, running_as_root: bool
) -> tuple[str, str, str | None]:
    """(controller, detail, fix or None) for one controller."""
    if hierarchy is None:
        return (
            controller,
            "not mounted",
            f"mount it (cgroup v1: mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}; "
            "cgroup v2: enable it in the parent's cgroup.subtree_control)",
        )
    where = f"cgroup {hierarchy.version} at {hierarchy.mount}"
    if not hierarchy.writable:
        fix = hierarchy.fix or _root_fix(running_as_root)
        return controller, f"{where}, not writable: {hierarchy.error}", fix
    return controller, f"{where}, writable", None


@dataclass(frozen=True, kw_only=True)
class CgroupSupport:
    """What this host lets Patinox enforce with cgroups (from :func:`detect_cgroups`).

    Attributes:
        version: ``"v1"`` when any controller Patinox uses comes from a v1 mount (also on
            hybrid hosts), ``"v2"`` for the unified hierarchy alone, ``None`` when no cgroup
            hierarchy is mounted under ``root``.
        root: where the hierarchies were looked for (``/sys/fs/cgroup``).
        controllers: the writable ones among :data:`CONTROLLERS`.
        problems: what is missing, each with its fix, human text (empty when all is there).
        hierarchies: the hierarchies found, v1 first.
        hybrid: v1 and v2 mounts side by side.
        running_as_root: whether this process runs as uid 0.
        tmpfs: whether a size-capped tmpfs could be mounted (the tenants' working directories).
        tmpfs_detail: what the tmpfs probe saw.
        lines: (controller, detail, fix) per controller, for :meth:`checks`.
    """

    version: CgroupVersion | None
    root: Path
    controllers: frozenset[str]
    problems: tuple[str, ...]
    hierarchies: tuple[Hierarchy, ...] = ()
    hybrid: bool = False
    running_as_root: bool = False
    tmpfs: bool = False
    tmpfs_detail: str = ""
    lines: tuple[tuple[str, str, str | None], ...] = ()

    def enforces(self, what: str) -> bool:
        """Whether the ``what`` controller (one of :data:`CONTROLLERS`) is writable here.

        Raises:
            ConfigurationError: ``what`` is not one of :data:`CONTROLLERS`.
        """
        if what not in CONTROLLERS:
            raise ConfigurationError(f"unknown cgroup controller {what!r}; known: {', '.join(CONTROLLERS)}")
        return what in self.controllers

    def hierarchy_of(self, controller: str) -> Hierarchy | None:
        """The hierarchy that carries ``controller`` (v1 first), writable or not."""
        return next((h for h in self.hierarchies if controller in h.controllers), None)

    def checks(self) -> list[Check]:
        """``patinox doctor`` lines: cgroup version, each controller, root, tmpfs."""
        if self.version is None:
            version = Check(
                name="cgroup version",
                ok=False,
                detail=f"no cgroup hierarchy mounted under {self.root}",
                fix="mount cgroup2 at /sys/fs/cgroup (or the v1 controllers); rlimits only meanwhile",
            )
        else:
            mounts = ", ".join(f"{h.version} {h.mount}" for h in self.hierarchies)
            hybrid = " (hybrid: v1 and v2 mounted side by side)" if self.hybrid else ""
            version = Check(name="cgroup version", ok=True, detail=f"{self.version}{hybrid}: {mounts}")
        lines = [version]
        for controller, detail, fix in self.lines:
            lines.append(
                Check(name=f"cgroup {controller} controller", ok=fix is None, detail=detail, fix=fix)
            )
        lines.append(
            Check(
                name="running as root",
                ok=self.running_as_root,
                detail=f"uid {os.geteuid()}",
                fix=None
                if self.running_as_root
                else "run as root for per-tenant uids, tmpfs working directories and cgroups; "
                "without it execution processes get rlimits only and share this uid",
            )
        )
        lines.append(
            Check(
                name="tmpfs working directories",
                ok=self.tmpfs,
                detail=self.tmpfs_detail,
                fix=None
                if self.tmpfs
                else "run as root (CAP_SYS_ADMIN) so each tenant's directory is a size-capped tmpfs; "
                "meanwhile it is a plain directory with no size cap",
            )
        )
        return lines


def detect_cgroups(root: Path = Path("/sys/fs/cgroup")) -> CgroupSupport:
    """What this host can enforce: the cgroup hierarchies under ``root`` (from
    ``/proc/self/mountinfo``), which controllers this process can write (by creating and
    removing a probe group in each), and whether it can mount a tmpfs.

    Never raises for a missing feature: what is missing is in ``problems`` and ``checks()``.
    """
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        mountinfo = ""
    hierarchies = _hierarchies(root, mountinfo)
    running_as_root = os.geteuid() == 0
    tmpfs, tmpfs_detail = probe_tmpfs()
    support = CgroupSupport(
        version=None, root=root, controllers=frozenset(), problems=(), hierarchies=tuple(hierarchies)
    )
    lines = tuple(_controller_line(c, support.hierarchy_of(c), running_as_root) for c in CONTROLLERS)
    chosen = [support.hierarchy_of(c) for c in CONTROLLERS]
    versions = {h.version for h in hierarchies}
    version: CgroupVersion | None = None
    if any(h is not None and h.version == "v1" for h in chosen):
        version = "v1"
    elif "v2" in versions:
        version = "v2"
    problems = [f"cgroup {c}: {detail}; fix: {fix}" for c, detail, fix in lines if fix is not None]
    if not tmpfs:
        problems.append(f"tmpfs working directories: {tmpfs_detail}; fix: run as root")
    return CgroupSupport(
        version=version,
        root=root,
        controllers=frozenset(c for c, _, fix in lines if fix is None),
        problems=tuple(problems),
        hierarchies=tuple(hierarchies),
        hybrid=versions == {"v1", "v2"},
        running_as_root=running_as_root,
        tmpfs=tmpfs,
        tmpfs_detail=tmpfs_detail,
        lines=lines,
    )


def rlimits_for(limits: ResourceLimits, support: CgroupSupport) -> list[tuple[int, int, int]]:
    """The rlimits an execution process sets on itself before dropping privileges.

    Returns:
        ``(resource.RLIMIT_*, soft, hard)`` triples: always ``RLIMIT_NOFILE``
        (``max_open_files``) and ``RLIMIT_CORE`` 0 (no core files with tenant memory in
        them); ``RLIMIT_AS`` (``exec_memory_bytes``, per process, a weaker stand-in) when
        the memory controller is not enforced; ``RLIMIT_NPROC`` (``max_processes``, per uid)
        when the pids controller is not. CPU time is measured by the host from the cgroup,
        never with ``RLIMIT_CPU``, which adds up across the runs of a reused process.
    """
    out = [
        (resource.RLIMIT_NOFILE, limits.max_open_files, limits.max_open_files),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if not support.enforces("memory"):
        out.append((resource.RLIMIT_AS, limits.exec_memory_bytes, limits.exec_memory_bytes))
    if not support.enforces("pids"):
        out.append((resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes))
    return out


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
