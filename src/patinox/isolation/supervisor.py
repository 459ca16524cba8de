"""The supervisor of a host's execution pools: one per host process that executes runs.

:class:`PoolSupervisor` owns the tenants' pools (:class:`~patinox.isolation.pool.TenantPool`),
the template that forks their processes (:mod:`patinox.isolation.template`), and per tenant
a cgroup with a child per process, a writable directory and an execution identity (uid/gid)
when running as root. It starts a pool at a tenant's first run and when a tenant is
created, stops it when the tenant is suspended or deleted, and follows limit updates.

Per tenant the supervisor makes a cgroup (:mod:`patinox.isolation.cgroups`, where the
host's controllers are writable; its limits otherwise fall to rlimits), a writable
directory (:mod:`patinox.isolation.workdir`: a size-capped tmpfs as root) and, as root, an
execution uid/gid of its own; each process gets a child cgroup of its tenant's. A
``container``/``dedicated`` tenant's pool forks from a template of its own, in the tenant's
sandbox (:mod:`patinox.isolation.container`), taken from the pre-warmed spares
(:mod:`patinox.isolation.spares`) when one is ready.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import structlog

from patinox.errors import IsolationUnavailable, PatinoxError
from patinox.isolation.cgroups import (
    CgroupManager,
    CgroupSupport,
    TenantCgroup,
    detect_cgroups,
    rlimits_for,
)
from patinox.isolation.container import SandboxTemplate
from patinox.isolation.cores import CoreAllocator
from patinox.isolation.pool import (
    EXECUTION_LEVELS,
    SANDBOXED_LEVELS,
    START_ERRORS,
    PoolSettings,
    PoolStopped,
    TenantPool,
    basic_rlimits,
)
from patinox.isolation.sandbox import SandboxSpec
from patinox.isolation.spares import SPARE_LIMITS, Spare, SpareTemplates
from patinox.isolation.template import Template
from patinox.isolation.workdir import ExecIdentities, Workdirs
from patinox.tenancy import IsolationLevel, ResourceLimits

__all__ = ["PoolSupervisor", "TenantInfo"]

log = structlog.get_logger("patinox.isolation")


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

    Spares (:mod:`patinox.isolation.spares`): a new ``container``/``dedicated`` tenant's
    first sandboxed pool takes a pre-warmed template bound to no tenant yet, instead of
    starting bubblewrap and an interpreter importing the agent stack (seconds).
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
        # Pre-warmed sandboxed templates (container hosts, as root).
        self._spare_templates = SpareTemplates(
            target=settings.spare_templates if sandboxes and self._root else 0,
            spawner=self._spawner,
            cgroups=cgroups,
            workdirs=self.workdirs,
            identities=self._identities,
            cpus=lambda name: self._cpus(name, IsolationLevel.CONTAINER, SPARE_LIMITS),
        )
        _say_mechanisms(self.mechanisms())
        self._spare_templates.start()

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
        spare = self._spare_templates.take(tenant_id) if level in SANDBOXED_LEVELS and self._root else None
        if spare is not None:
            try:
                return self._bind_spare(spare, tenant_id, limits, level)
            except START_ERRORS as err:
                log.warning(
                    "a spare template was not bound; starting one", tenant_id=tenant_id, error=str(err)
                )
                self._spawner.submit(self._spare_templates.drop, spare)
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

    def spares(self) -> list[Spare]:
        """The spare templates now (oldest first), started or starting."""
        return self._spare_templates.spares()

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
        """Bind ``spare`` to the tenant (:meth:`SpareTemplates.bind`) and make its pool."""
        cgroup = self._tenant_cgroup(tenant_id, limits, level)
        template, workdir, uid, gid = self._spare_templates.bind(spare, tenant_id, limits, cgroup)
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
                except START_ERRORS as err:
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
        for pool in pools:
            pool.stop()
        for template in templates:
            template.close()
        self._spare_templates.close()
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
