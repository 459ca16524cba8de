"""What this host can enforce, level by level: the facts ``patinox doctor`` prints and the
set of isolation levels a deployment offers.

Each part is probed for real (a cgroup created and removed, a tmpfs mounted, a bubblewrap
sandbox started), so the answer is what this host does, not what its configuration files
say. Probing takes tens of milliseconds; :func:`detect_host` is meant for start-up and
``patinox doctor``, not for a request's path.

Which levels a host gives (:meth:`HostSupport.levels`):

``namespace``
    Always: the shared process; isolation is logical.
``process``
    Always on Linux: execution processes forked from a warm template, limited by cgroups
    where the host allows it and by rlimits otherwise (:meth:`HostSupport.mechanism` says
    which, and the doctor lines say what is missing).
``container``
    When a bubblewrap sandbox with its own PID and network namespaces starts and Python runs
    in it as a tenant's uid.
``dedicated``
    ``container``, plus at least one core that can be kept for one tenant (a writable cpuset
    controller, or CPU affinity where cgroups lack it) while one stays for shared work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from patinox.isolation import sandbox
from patinox.isolation.cgroups import CgroupSupport, detect_cgroups
from patinox.isolation.checks import Check
from patinox.isolation.cores import CoreAllocator
from patinox.tenancy import IsolationLevel

__all__ = ["HostSupport", "detect_host"]

#: The doctor lines of the container level that must all pass for it.
_CONTAINER_NEEDS = (
    "bubblewrap",
    "bubblewrap sandbox starts",
    "PID namespace",
    "network namespace",
    "Python in a tenant sandbox",
)


@dataclass(frozen=True, kw_only=True)
class HostSupport:
    """What this host can enforce (from :func:`detect_host`).

    Attributes:
        cgroups: the cgroup hierarchies and writable controllers.
        sandbox: the bubblewrap and namespace lines (:func:`patinox.isolation.sandbox.checks`).
        cores: the dedicated-core line (:meth:`patinox.isolation.cores.CoreAllocator.checks`).
        free_cores: cores one more dedicated tenant could get now.
    """

    cgroups: CgroupSupport
    sandbox: tuple[Check, ...]
    cores: tuple[Check, ...]
    free_cores: int

    def checks(self) -> list[Check]:
        """Every ``patinox doctor`` line, cgroups first, then the sandbox, then cores."""
        return [*self.cgroups.checks(), *self.sandbox, *self.cores]

    def mechanism(self) -> str:
        """How execution limits are enforced here, one phrase: ``cgroup v1 (memory, cpu, pids,
        cpuset, cpuacct) and rlimits`` or ``rlimits only (no writable cgroup controller)``."""
        if not self.cgroups.controllers:
            return "rlimits only (no writable cgroup controller)"
        names = ", ".join(sorted(self.cgroups.controllers))
        return f"cgroup {self.cgroups.version} ({names}) and rlimits"

    def container_ok(self) -> bool:
        """Whether every line the ``container`` level needs passed."""
        passed = {c.name for c in self.sandbox if c.ok}
        return all(name in passed for name in _CONTAINER_NEEDS)

    def levels(self) -> frozenset[IsolationLevel]:
        """The isolation levels this host can enforce (module docstring)."""
        levels = {IsolationLevel.NAMESPACE}
        if os.name == "posix" and hasattr(os, "fork"):
            levels.add(IsolationLevel.PROCESS)
        if self.container_ok():
            levels.add(IsolationLevel.CONTAINER)
            if self.free_cores > 0:
                levels.add(IsolationLevel.DEDICATED)
        return frozenset(levels)


def detect_host(cores: CoreAllocator | None = None) -> HostSupport:
    """Probe this host (see the module docstring).

    Args:
        cores: the deployment's core allocator (its reservations count); a fresh one over
            this process's CPUs when ``None``.
    """
    cores = cores or CoreAllocator()
    return HostSupport(
        cgroups=detect_cgroups(),
        sandbox=tuple(sandbox.checks()),
        cores=tuple(cores.checks()),
        free_cores=cores.free_count(),
    )
