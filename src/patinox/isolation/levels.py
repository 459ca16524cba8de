"""The executor of each isolation level, behind one :class:`~patinox.control.runs.RunExecutor`.

:class:`ExecutorMap` is what the run service is given: it runs each run with the executor
of its tenant's isolation level (``ctx.isolation_level``), so a tenant that changes level
is served by the new level's executor from its next run, and no other code asks which
level a tenant is at.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from pydantic_ai.usage import RunUsage

from patinox.agents import AgentDefinition, MemoryStore, RunLimits, RunOutcome
from patinox.agents.runner import Role
from patinox.errors import IsolationUnavailable
from patinox.tenancy import IsolationLevel, ResourceLimits, TenantContext

__all__ = ["ExecutorMap", "LevelExecutor", "process_isolation_available"]


class LevelExecutor(Protocol):
    """One level's executor (the shape of :class:`~patinox.control.runs.RunExecutor`)."""

    def execute(
        self,
        ctx: TenantContext,
        definition: AgentDefinition,
        prompt: str,
        *,
        output_tokens: int | None,
        limits: RunLimits,
        memory: MemoryStore,
        usage: RunUsage | None = None,
        on_usage: Callable[[RunUsage], None] | None = None,
        history: tuple[tuple[Role, str], ...] = (),
    ) -> Awaitable[RunOutcome]: ...


def process_isolation_available() -> tuple[bool, str]:
    """Whether this host can run execution processes (``process`` level), and why not.

    Needs Linux (``prctl``, ``/proc``), ``fork`` and passing sockets between processes
    (``SCM_RIGHTS``). Not being root is no reason: processes then keep the host's uid and
    are limited by rlimits only, which the supervisor says at start-up.
    """
    if not sys.platform.startswith("linux"):
        return False, f"execution processes need Linux, not {sys.platform}"
    if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
        return False, "execution processes need fork() and SCM_RIGHTS"
    return True, "available"


class ExecutorMap:
    """Runs each run with the executor of its tenant's isolation level.

    Args:
        executors: the executor of each level this deployment enforces.
    """

    def __init__(self, executors: Mapping[IsolationLevel, LevelExecutor]) -> None:
        self._executors = dict(executors)

    @property
    def levels(self) -> frozenset[IsolationLevel]:
        """The levels with an executor."""
        return frozenset(self._executors)

    def get(self, level: IsolationLevel) -> LevelExecutor | None:
        """The executor of ``level``, if this deployment has one."""
        return self._executors.get(level)

    def execute(
        self,
        ctx: TenantContext,
        definition: AgentDefinition,
        prompt: str,
        *,
        output_tokens: int | None,
        limits: RunLimits,
        memory: MemoryStore,
        usage: RunUsage | None = None,
        on_usage: Callable[[RunUsage], None] | None = None,
        history: tuple[tuple[Role, str], ...] = (),
    ) -> Awaitable[RunOutcome]:
        """The run, by the executor of ``ctx.isolation_level`` (see ``RunExecutor``).

        Raises:
            IsolationUnavailable: at once, when no executor enforces that level here.
        """
        executor = self._executors.get(ctx.isolation_level)
        if executor is None:
            raise IsolationUnavailable(
                f"isolation level {ctx.isolation_level.value!r} is not available in this process",
                isolation_level=ctx.isolation_level.value,
            )
        # ``history`` only when there is one: an executor of an earlier shape still runs
        # every run without.
        more = {"history": history} if history else {}
        return executor.execute(
            ctx,
            definition,
            prompt,
            output_tokens=output_tokens,
            limits=limits,
            memory=memory,
            usage=usage,
            on_usage=on_usage,
            **more,
        )

    def _distinct(self) -> list[LevelExecutor]:
        """Each executor once (one may serve several levels)."""
        seen: dict[int, LevelExecutor] = {}
        for executor in self._executors.values():
            seen.setdefault(id(executor), executor)
        return list(seen.values())

    def prepare(self, tenant_id: str, level: IsolationLevel, limits: ResourceLimits) -> None:
        """Reserve what a tenant needs at ``level`` before its row is written (a
        ``dedicated`` tenant's cores): the tenant manager calls it on creation, so a refusal
        leaves nothing half-created. Undo with :meth:`release`.

        Raises:
            IsolationUnavailable: no executor for ``level`` here, or its resources are not
                free (e.g. fewer free cores than ``limits.dedicated_cores``; the error says
                how many are free).
        """
        executor = self._executors.get(level)
        if executor is None:
            raise IsolationUnavailable(
                f"isolation level {level.value!r} is not available in this process",
                isolation_level=level.value,
            )
        prepare = getattr(executor, "prepare", None)
        if prepare is not None:
            prepare(tenant_id, level, limits)

    def release(self, tenant_id: str) -> None:
        """Give back what :meth:`prepare` reserved for a tenant that was not created."""
        for executor in self._distinct():
            release = getattr(executor, "release", None)
            if release is not None:
                release(tenant_id)

    def on_tenant_event(self, tenant_id: str, event: str) -> None:
        """Tenant-manager listener: passed on to every executor that listens (once each)."""
        for executor in self._distinct():
            listener = getattr(executor, "on_tenant_event", None)
            if listener is not None:
                listener(tenant_id, event)

    def close(self) -> None:
        """Close every executor holding resources (their processes stop)."""
        for executor in self._distinct():
            close = getattr(executor, "close", None)
            if close is not None:
                close()

    async def aclose(self) -> None:
        """:meth:`close`, for :meth:`~patinox.control.runs.RunService.shutdown`."""
        for executor in self._distinct():
            aclose = getattr(executor, "aclose", None)
            if aclose is not None:
                await aclose()
