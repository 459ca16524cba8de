"""The ``namespace`` executor: runs the agent in the shared server process.

Isolation at this level is logical: the run gets its tenant's context and a store bound
to that tenant, and only the tools the agent lists. CPU and memory cannot be limited per
tenant inside one process, so tenants needing those limits need another isolation level
(refused at tenant creation until it is available, never silently downgraded).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pydantic_ai.usage import RunUsage

from patinox.agents import AgentDefinition, MemoryStore, RunLimits, RunOutcome, run_agent
from patinox.errors import TenantContextAlreadySet
from patinox.isolation.egress import GuardedFetcher
from patinox.network import EgressSettings
from patinox.tenancy import TenantContext, current_tenant_or_none, tenant_scope


class NamespaceExecutor:
    """In-process execution within the tenant's context.

    Args:
        egress: the operator's egress settings for the ``http_fetch`` tool (defaults:
            ``https`` to public addresses only, on each tenant's allow-list).
    """

    def __init__(self, egress: EgressSettings | None = None) -> None:
        self.egress = egress or EgressSettings()

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
    ) -> Awaitable[RunOutcome]:
        """The run of ``definition`` on ``prompt`` for ``ctx``'s tenant, to await.

        Inside that tenant's scope (a request's run) this is the agent's own run, with no
        coroutine of its own around it: a run resumes about fourteen times, and each layer
        it passes through costs each time. Outside any scope (a worker's run) the run is
        wrapped in the tenant's scope.

        Raises:
            RunFailed: the run failed, when awaited (see :func:`patinox.agents.run_agent`).
            TenantContextAlreadySet: at once, when the caller is inside another tenant's scope.
        """
        run = run_agent(
            definition,
            prompt,
            output_tokens=output_tokens,
            limits=limits,
            memory=memory,
            usage=usage,
            on_usage=on_usage,
            fetch=GuardedFetcher(ctx, self.egress),
        )
        active = current_tenant_or_none()
        if active is None:
            return _in_scope(ctx, run)
        if active.tenant_id != ctx.tenant_id:
            run.close()  # never started: closed, so it is not reported as never awaited
            raise TenantContextAlreadySet(
                "executing a run for one tenant inside another tenant's scope",
                active_tenant_id=active.tenant_id,
            )
        return run


async def _in_scope(ctx: TenantContext, run: Coroutine[Any, Any, RunOutcome]) -> RunOutcome:
    """Await ``run`` (not started yet) inside ``ctx``'s tenant scope."""
    with tenant_scope(ctx):
        return await run
