"""Pre-warmed sandboxed templates bound to no tenant yet ("spares").

A ``container``/``dedicated`` tenant's template is bubblewrap plus an interpreter importing
the agent stack: seconds to start. A spare is one started ahead as a placeholder
(``spare-<hex>``: its own uid, a small tmpfs bound at ``/work``, its own cgroup). A new
tenant's first sandboxed pool (no uid, no directory yet) takes one
(:meth:`SpareTemplates.take`) and binds it (:meth:`SpareTemplates.bind`): the uid passes to
the tenant (:meth:`~patinox.isolation.workdir.ExecIdentities.adopt`), the tmpfs becomes
the tenant's directory (:meth:`~patinox.isolation.workdir.Workdirs.adopt`: resized to
``disk_bytes``, owned by the uid), every process of the spare's cgroup moves into the
tenant's ``template`` group; from then on it is the tenant's template as if started for
it. The memory the template touched before binding stays charged to the parent group
(cgroup v2 does not move charges); what it allocates after is the tenant's.

The host's :class:`~patinox.isolation.supervisor.PoolSupervisor` keeps one
:class:`SpareTemplates` and refills it in the background after each take.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from patinox.errors import PatinoxError
from patinox.isolation.cgroups import CgroupManager, TenantCgroup
from patinox.isolation.container import SandboxTemplate
from patinox.isolation.pool import START_ERRORS
from patinox.isolation.sandbox import SandboxSpec
from patinox.isolation.workdir import ExecIdentities, Workdirs
from patinox.tenancy import PLANS, ResourceLimits

__all__ = ["SPARE_LIMITS", "Spare", "SpareTemplates"]

log = structlog.get_logger("patinox.isolation")

#: A spare's cgroup limits until it is bound (then the tenant's apply): the largest plan's.
SPARE_LIMITS = PLANS["enterprise"].limits
#: A spare's directory size until it is bound (then resized to the tenant's ``disk_bytes``).
_SPARE_DISK_BYTES = 1 << 20


@dataclass(frozen=True)
class Spare:
    """A pre-warmed sandboxed template bound to no tenant yet (:class:`SpareTemplates`).

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


class SpareTemplates:
    """The spares of one supervisor (see the module docstring). Thread-safe.

    Args:
        target: how many spares to keep ready (0: none, and :meth:`take` finds none).
        spawner: the supervisor's worker threads, where spares are started and dropped.
        cgroups: the host's tenant cgroups; ``None``: none.
        workdirs, identities: the supervisor's tenants' directories and execution uids.
        cpus: a spare's cpuset by its name (the shared cores; ``None``: no pinning).
    """

    def __init__(
        self,
        *,
        target: int,
        spawner: concurrent.futures.Executor,
        cgroups: CgroupManager | None,
        workdirs: Workdirs,
        identities: ExecIdentities,
        cpus: Callable[[str], tuple[int, ...] | None],
    ) -> None:
        self.target = target
        self._spawner = spawner
        self._cgroups = cgroups
        self._workdirs = workdirs
        self._identities = identities
        self._cpus = cpus
        self._lock = threading.Lock()
        self._spares: deque[Spare] = deque()
        self._starting = 0
        self._closed = False

    def start(self) -> None:
        """Start filling up to :attr:`target` in the background (nothing when 0)."""
        if self.target > 0:
            self._spawner.submit(self.refill)

    def spares(self) -> list[Spare]:
        """The spare templates now (oldest first), started or starting."""
        with self._lock:
            return list(self._spares)

    def refill(self) -> None:
        """Start spares until :attr:`target` exist (a spawner thread's job)."""
        while True:
            with self._lock:
                if self._closed or len(self._spares) + self._starting >= self.target:
                    return
                self._starting += 1
            try:
                spare = self._new()
            except START_ERRORS as err:
                log.warning("a spare template was not started", error=str(err))
                with self._lock:
                    self._starting -= 1
                return
            with self._lock:
                self._starting -= 1
                kept = not self._closed
                if kept:
                    self._spares.append(spare)
            if not kept:
                self.drop(spare)

    def _new(self) -> Spare:
        name = f"spare-{secrets.token_hex(6)}"
        uid, gid = self._identities.for_tenant(name)
        cgroup = None
        try:
            procs: tuple[Path, ...] = ()
            if self._cgroups is not None:
                cgroup = self._cgroups.tenant(name, SPARE_LIMITS, cpus=self._cpus(name))
                procs = cgroup.child("template").procs_files()
            workdir = self._workdirs.ensure(name, uid=uid, gid=gid, size_bytes=_SPARE_DISK_BYTES).path
            template = SandboxTemplate(SandboxSpec(workdir=workdir, uid=uid, gid=gid), cgroup_procs=procs)
            template.start()
        except BaseException:
            self._remove(name)
            raise
        return Spare(name, uid, gid, template, cgroup)

    def drop(self, spare: Spare) -> None:
        """Close an unbound spare and remove its cgroup, directory and uid (best effort)."""
        spare.template.close()
        self._remove(spare.name)

    def _remove(self, name: str) -> None:
        with contextlib.suppress(PatinoxError, OSError):
            if self._cgroups is not None:
                self._cgroups.remove_tenant(name)
        with contextlib.suppress(PatinoxError, OSError):
            self._workdirs.remove(name)
        with contextlib.suppress(PatinoxError, OSError):
            self._identities.release(name)

    def take(self, tenant_id: str) -> Spare | None:
        """A live spare for a new tenant, and a refill started; ``None`` when there is none
        or the tenant already has a uid or a directory (its files are owned by that uid: it
        gets a template started for it)."""
        with self._lock:
            if not self._spares:
                return None
            if self._identities.known(tenant_id) is not None or self._workdirs.path(tenant_id).exists():
                return None
            spare = None
            for candidate in list(self._spares):  # oldest first; one still being launched waits
                if candidate.template.failed:
                    self._spares.remove(candidate)
                    self._spawner.submit(self.drop, candidate)
                elif spare is None and candidate.template.launched:
                    self._spares.remove(candidate)
                    spare = candidate
            if spare is None:
                return None
            if not self._closed:
                self._spawner.submit(self.refill)
            return spare

    def bind(
        self, spare: Spare, tenant_id: str, limits: ResourceLimits, cgroup: TenantCgroup | None
    ) -> tuple[SandboxTemplate, Path, int, int]:
        """Make ``spare`` the tenant's (module docstring): its directory, uid and processes
        pass to the tenant (whose cgroup is ``cgroup``, already made), its own cgroup is
        removed. Returns the template, the tenant's directory, uid and gid.

        Raises:
            IsolationFailed, OSError: the directory, uid or cgroup could not be moved.
        """
        workdir = self._workdirs.adopt(
            tenant_id, spare.name, uid=spare.uid, gid=spare.gid, size_bytes=limits.disk_bytes
        ).path
        uid, gid = self._identities.adopt(tenant_id, spare.name)
        procs: tuple[Path, ...] = ()
        if self._cgroups is not None and cgroup is not None and spare.cgroup is not None:
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
            self._cgroups.remove_tenant(spare.name)
        template = spare.template
        template.rebind(replace(template.spec, workdir=workdir), cgroup_procs=procs)
        return template, workdir, uid, gid

    def close(self) -> None:
        """Drop every spare and start none from now on (idempotent)."""
        with self._lock:
            self._closed = True
            spares, self._spares = list(self._spares), deque()
        for spare in spares:
            self.drop(spare)
