"""CPU cores for ``dedicated`` tenants: which cores are free, which are whose.

A dedicated tenant's execution processes run on cores no other tenant's work uses (its
cgroup's cpuset, see :meth:`patinox.isolation.cgroups.CgroupManager.tenant`); Patinox's own
processes and every other tenant keep to :meth:`CoreAllocator.shared`. At least
``keep_shared`` cores always stay shared, so on a 2-core host one core can be dedicated to
one tenant while shared work keeps the other.
"""

from __future__ import annotations

import errno
import os
import threading

from patinox.errors import ConfigurationError, IsolationFailed, IsolationUnavailable
from patinox.isolation.checks import Check

__all__ = ["CoreAllocator"]


class CoreAllocator:
    """Reservations of whole CPU cores per tenant, in this process.

    Args:
        cpus: the cores to hand out (default: the ones this process may run on,
            ``os.sched_getaffinity(0)``).
        keep_shared: cores that are never reserved (shared work needs somewhere to run).

    Raises:
        ConfigurationError: no cpus, or ``keep_shared`` negative.
    """

    def __init__(self, cpus: tuple[int, ...] | None = None, *, keep_shared: int = 1) -> None:
        chosen = tuple(sorted(set(os.sched_getaffinity(0) if cpus is None else cpus)))
        #: Whether :meth:`confine_this_process` narrowed this process (see :meth:`unconfine`).
        self.confined = False
        if not chosen or keep_shared < 0:
            raise ConfigurationError(f"core allocator needs cpus (got {chosen}) and keep_shared >= 0")
        self.cpus = chosen
        self.keep_shared = keep_shared
        self._reserved: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def _free(self, besides: str | None = None) -> list[int]:
        taken = {c for t, cores in self._reserved.items() if t != besides for c in cores}
        return [c for c in self.cpus if c not in taken]

    def reserve(self, tenant_id: str, count: int) -> tuple[int, ...]:
        """``count`` cores for ``tenant_id`` alone, sorted. Idempotent: a tenant that holds
        cores keeps those it can (a different ``count`` grows or shrinks its set). The
        highest-numbered free cores go first (CPU 0 tends to carry the host's interrupts).

        Raises:
            ConfigurationError: ``count`` below 1.
            IsolationUnavailable: fewer than ``count`` cores are free once ``keep_shared``
                are kept back; ``free_cores`` says how many could be given, ``requested_cores``
                how many were asked.
        """
        if count < 1:
            raise ConfigurationError(f"a dedicated tenant needs at least one core, not {count}")
        with self._lock:
            free = self._free(besides=tenant_id)
            available = max(0, len(free) - self.keep_shared)
            if count > available:
                raise IsolationUnavailable(
                    f"tenant {tenant_id} asks for {count} dedicated core(s) but {available} "
                    f"of this host's {len(self.cpus)} are free ({self.keep_shared} kept for shared "
                    "work, the rest dedicated to other tenants)",
                    isolation_level="dedicated",
                    tenant_id=tenant_id,
                    requested_cores=count,
                    free_cores=available,
                )
            held = sorted((c for c in self._reserved.get(tenant_id, ()) if c in free), reverse=True)[:count]
            others = [c for c in reversed(free) if c not in held]
            cores = tuple(sorted(held + others[: count - len(held)]))
            self._reserved[tenant_id] = cores
            return cores

    def release(self, tenant_id: str) -> None:
        """Give the tenant's cores back to shared work (none held is fine)."""
        with self._lock:
            self._reserved.pop(tenant_id, None)

    def reserved(self, tenant_id: str) -> tuple[int, ...]:
        """The tenant's cores; empty when it holds none."""
        with self._lock:
            return self._reserved.get(tenant_id, ())

    def shared(self) -> tuple[int, ...]:
        """Cores left for shared work: Patinox's own processes and non-dedicated tenants."""
        with self._lock:
            return tuple(self._free())

    def free_count(self) -> int:
        """How many cores one more dedicated tenant could still get."""
        with self._lock:
            return max(0, len(self._free()) - self.keep_shared)

    def confine_this_process(self) -> tuple[int, ...]:
        """Keep every thread of this process (Patinox's own work) on :meth:`shared` cores;
        threads started later inherit it. Call it again after each reservation or release.
        Returns the cores it set.

        Raises:
            IsolationFailed: the kernel refused the affinity (cores outside this process's cpuset).
        """
        cores = self.shared()
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except ProcessLookupError:
                continue  # that thread ended meanwhile
            except OSError as err:
                raise IsolationFailed(
                    f"cannot keep thread {tid} on CPUs {cores}: {err.strerror}",
                    path=f"/proc/self/task/{tid}",
                    operation="sched_setaffinity",
                    errno_name=errno.errorcode.get(err.errno or 0),
                ) from err
        self.confined = True
        return cores

    def unconfine(self) -> None:
        """Put every thread of this process back on all :attr:`cpus` (after
        :meth:`confine_this_process`; nothing otherwise). Best effort."""
        if not self.confined:
            return
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), self.cpus)
            except OSError:
                continue
        self.confined = False

    def checks(self) -> list[Check]:
        """The ``patinox doctor`` line: cores this host can dedicate."""
        free = self.free_count()
        return [
            Check(
                name="free cores for dedicated tenants",
                ok=free > 0,
                detail=f"{free} of {len(self.cpus)} (CPUs {','.join(map(str, self.cpus))}; "
                f"{self.keep_shared} kept for shared work)",
                fix=None if free > 0 else "a host with more cores, or fewer dedicated tenants on this one",
            )
        ]
