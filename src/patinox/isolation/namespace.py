"""The ``namespace`` executor: runs the agent in the shared server process.

Isolation at this level is logical: the run gets its tenant's context and a store bound
to that tenant, and only the tools the agent lists. CPU and memory cannot be limited per
tenant inside one process, so tenants needing those limits need another isolation level
(refused at tenant creation until it is available, never silently downgraded).
"""

from __future__ import annotations

from patinox.agents import AgentDefinition, MemoryStore, RunLimits, RunOutcome, run_agent
from patinox.errors import TenantContextAlreadySet
from patinox.tenancy import TenantContext, current_tenant_or_none, tenant_scope


class NamespaceExecutor:
    """In-process execution within the tenant's context."""

    async def execute(
        self,
        ctx: TenantContext,
        definition: AgentDefinition,
        prompt: str,
        *,
        output_tokens: int | None,
        limits: RunLimits,
        memory: MemoryStore,
    ) -> RunOutcome:
        """Run ``definition`` on ``prompt`` for ``ctx``'s tenant.

        Raises:
            RunFailed: the run failed (see :func:`patinox.agents.run_agent`).
            TenantContextAlreadySet: the caller is inside another tenant's scope.
        """
        active = current_tenant_or_none()
        if active is not None:
            if active.tenant_id != ctx.tenant_id:
                raise TenantContextAlreadySet(
                    "executing a run for one tenant inside another tenant's scope",
                    active_tenant_id=active.tenant_id,
                )
            return await run_agent(
                definition, prompt, output_tokens=output_tokens, limits=limits, memory=memory
            )
        with tenant_scope(ctx):
            return await run_agent(
                definition, prompt, output_tokens=output_tokens, limits=limits, memory=memory
            )
