"""What this host's cgroups let Patinox enforce: the hierarchies, their controllers, and the
rlimits that stand in for a missing one.

:func:`detect_cgroups` finds every cgroup hierarchy (``/proc/self/mountinfo``): cgroup v1
(one mount per controller or per co-mounted set), cgroup v2 (the unified hierarchy) and
hybrid hosts (v1 controllers beside a v2 mount that carries none or a few of them), and
probes which of them this process can write. :class:`CgroupSupport` holds the answer and
says what is missing, with its fix (``patinox doctor``); :func:`rlimits_for` replaces a
controller the host does not give Patinox where an rlimit can. The per-tenant groups made
on top of it are :mod:`patinox.isolation.cgroups`.

Never raises for a missing feature: what is missing is reported, and the groups fail
closed when used without it.
"""

from __future__ import annotations

import os
import re
import resource
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from patinox.errors import ConfigurationError
from patinox.isolation.checks import Check
from patinox.isolation.workdir import probe_tmpfs
from patinox.tenancy.plans import ResourceLimits

__all__ = [
    "CONTROLLERS",
    "CgroupSupport",
    "CgroupVersion",
    "Hierarchy",
    "cpus_text",
    "detect_cgroups",
    "parse_cpus",
    "rlimits_for",
]

#: The controllers Patinox uses, in the order ``patinox doctor`` lists them.
CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "cpuacct", "pids", "cpuset")

CgroupVersion = Literal["v1", "v2"]

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


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
