"""The runs executing in this process, by tenant, and what stops them.

Every run this process executes (a synchronous run it admitted, a queued run its worker
claimed) is a :class:`RunTask` registered here while it runs. Stopping a run is cancelling
its task with a reason (:attr:`RunTask.stop_reason`); the run path
(:mod:`patinox.control.runs`) settles a cancelled run with that reason. Runs are stopped:

- all of a tenant's, when it is suspended or deleted (:meth:`RunsInFlight.stop_tenant`),
  after which the tenant is *fenced*: a run whose admission was under way meanwhile is
  cancelled before its first step (:meth:`RunsInFlight.track`);
- those still executing at an isolation level their tenant left
  (:meth:`RunsInFlight.stop_stale`, reason ``isolation_level_change``);
- one at its tenant's request (:meth:`RunsInFlight.stop`, reason ``cancelled``);
- all, at shutdown (:meth:`RunsInFlight.stop_all`).

Everything here runs on the process's run loop; :meth:`RunsInFlight.on_loop` brings a stop
there from another thread (the tenant manager's events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from patinox.storage import RunRecord

__all__ = ["CANCELLED_BY_REQUEST", "LEVEL_CHANGE", "RunTask", "RunsInFlight"]

#: The reason of a run cancelled because its tenant moved to another isolation level.
LEVEL_CHANGE = (
    "isolation_level_change",
    "the run was cancelled: its tenant moved to another isolation level and the run did not "
    "finish within the drain time",
)
#: The reason of a run its tenant cancelled (``POST /v1/runs/{id}/cancel``).
CANCELLED_BY_REQUEST = ("cancelled", "the run was cancelled at its tenant's request")


class RunTask(asyncio.Task[RunRecord]):
    """A run's task, whose ``repr`` is its name and state instead of asyncio's default,
    which formats the coroutine and every done callback with its source file and line.
    anyio puts the repr of the current task into the reason of every cancel scope it
    cancels, and the agent loop cancels several a run: the default repr cost a run about
    as much as one of its SQLite writes."""

    #: The isolation level the run executes at (its context's when it started).
    level: str = ""
    #: The run's id.
    run_id: str = ""
    #: Why the run was stopped, when it was cancelled for a reason of its own:
    #: ``(reason, message)``; ``None``: its tenant was stopped (or the process shuts down).
    stop_reason: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"<RunTask {self.get_name()!r} {'done' if self.done() else 'pending'}>"


def stop_reason_of_current_task() -> tuple[str, str] | None:
    """The ``(reason, message)`` the current run task was stopped for, if any."""
    task = asyncio.current_task()
    return task.stop_reason if isinstance(task, RunTask) else None


class RunsInFlight:
    """The run tasks of this process by tenant (see the module docstring).

    Args:
        fenced: the tenants no new run may start for in this process (shared with the
            admission, which refuses them); :meth:`stop_tenant` adds to it.
    """

    def __init__(self, fenced: set[str]) -> None:
        self.fenced = fenced
        self._tasks: dict[str, set[RunTask]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def track(
        self,
        job: Coroutine[Any, Any, RunRecord],
        *,
        tenant_id: str,
        level: str,
        run_id: str,
        on_unstarted: Callable[[], None],
    ) -> RunTask:
        """``job`` as a task among the tenant's runs in flight; ``on_unstarted()`` is called
        if the task ends cancelled before its first step (its run must be settled as
        such). One done callback does both: every run's task has it, and each callback
        costs the run. A fenced tenant's task is cancelled at once (it was stopped while
        its admission ran: the stop found no task to cancel)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        task = RunTask(job, loop=loop, name=f"run of {tenant_id}")
        task.level = level
        task.run_id = run_id
        tasks = self._tasks.setdefault(tenant_id, set())
        tasks.add(task)

        def done(t: asyncio.Task[RunRecord]) -> None:
            tasks.discard(t)
            if not tasks and self._tasks.get(tenant_id) is tasks:
                del self._tasks[tenant_id]
            if t.cancelled():
                on_unstarted()
            else:
                t.exception()  # retrieved: a failed run is recorded, not re-raised here

        task.add_done_callback(done)
        if tenant_id in self.fenced:
            task.cancel()
        return task

    # -- what runs here --------------------------------------------------------------

    def tenants(self) -> list[str]:
        """The tenants with runs in flight here."""
        return list(self._tasks)

    def holds(self, tenant_id: str) -> bool:
        """Whether ``tenant_id`` has runs in flight here."""
        return tenant_id in self._tasks

    def runs(self) -> list[tuple[str, str]]:
        """``(tenant_id, run_id)`` of every run in flight here."""
        return [(tenant_id, t.run_id) for tenant_id, tasks in self._tasks.items() for t in tasks]

    def task_of(self, tenant_id: str, run_id: str) -> RunTask | None:
        """The task of one of ``tenant_id``'s runs in flight here, or ``None``."""
        for t in self._tasks.get(tenant_id, ()):
            if t.run_id == run_id and not t.done():
                return t
        return None

    def stale(self, tenant_id: str, level: str) -> bool:
        """Whether a run of ``tenant_id`` executes here at another level than ``level``."""
        return any(t.level != level for t in self._tasks.get(tenant_id, ()))

    # -- stopping --------------------------------------------------------------------

    @staticmethod
    async def stop(tasks: Iterable[RunTask], reason: tuple[str, str] | None = None) -> int:
        """Cancel ``tasks`` (with ``reason``, when given) and wait until each ended (its run
        settled). Returns how many."""
        stopping = list(tasks)
        for t in stopping:
            if reason is not None:
                t.stop_reason = reason
            t.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
        return len(stopping)

    async def stop_tenant(self, tenant_id: str) -> int:
        """Fence the tenant (no new run starts in this process) and stop its runs in flight
        here, waiting until each is settled. Returns how many."""
        self.fenced.add(tenant_id)
        return await self.stop(self._tasks.get(tenant_id, ()))

    async def stop_stale(self, tenant_id: str, level: str) -> int:
        """Stop the tenant's runs in flight here that execute at another isolation level
        than ``level`` (its new one), reason ``isolation_level_change``. Returns how many."""
        stale = [t for t in self._tasks.get(tenant_id, ()) if t.level != level]
        return await self.stop(stale, LEVEL_CHANGE)

    async def stop_all(self) -> int:
        """Stop every run in flight here (shutdown). Returns how many."""
        return await self.stop([t for tasks in self._tasks.values() for t in tasks])

    def on_loop(self, stop: Coroutine[Any, Any, int]) -> bool:
        """Run ``stop`` on this process's run loop: waited for (at most 30 s) from another
        thread, scheduled from the loop itself (then returns True), dropped when no loop
        runs runs here."""
        loop = self._loop
        try:
            on_loop = loop is not None and asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is None or not loop.is_running():
            stop.close()
            return False
        if on_loop:
            loop.create_task(stop)
            return True
        asyncio.run_coroutine_threadsafe(stop, loop).result(timeout=30)
        return False
