"""Agent definitions of a tenant: what a tenant writes (:class:`AgentSpec`,
:class:`AgentPatch`) and their validated, audited CRUD (:class:`AgentService`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from patinox.agents import check_tool_isolation, check_tools_allowed, validate_model_id, validate_tool_names
from patinox.control.secrets import provider_key_name
from patinox.errors import InvalidRequest
from patinox.storage import AgentRecord, AnyRow, SqlBackend, TenantStore
from patinox.tenancy import TenantContext, check_model_allowed

__all__ = ["AgentPatch", "AgentService", "AgentSpec"]


class AgentSpec(BaseModel):
    """An agent definition as a tenant writes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    instructions: str = Field(default="", max_length=20_000)
    model: str | None = Field(
        default=None, max_length=200, description="a model id; default: the tenant's default_model"
    )
    tools: list[str] = Field(default_factory=list, max_length=32)
    max_output_tokens: int | None = Field(default=None, ge=1, le=10**7, description="per-run cap, tokens")
    max_tool_calls: int | None = Field(default=None, ge=0, le=10**4, description="per-run cap")


class AgentPatch(BaseModel):
    """A partial update of an agent; omitted fields stay."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
    )
    instructions: str | None = Field(default=None, max_length=20_000)
    model: str | None = Field(default=None, max_length=200)
    tools: list[str] | None = Field(default=None, max_length=32)
    max_output_tokens: int | None = Field(default=None, ge=1, le=10**7)
    max_tool_calls: int | None = Field(default=None, ge=0, le=10**4)


class AgentService:
    """Tenant-scoped agent CRUD with validation of models and tools."""

    def __init__(self, backend: SqlBackend) -> None:
        self._backend = backend

    def create(self, ctx: TenantContext, spec: AgentSpec) -> AgentRecord:
        """Create an agent (without a model: the tenant's ``default_model``). Raises
        UnknownModel, ModelNotAllowed (outside the tenant's ``allowed_models``), UnknownTool,
        ToolNotAllowed (a tool left out of the tenant's ``allowed_tools``), IsolationRequired
        (a tool, ``python``, needs a higher isolation level than the tenant's),
        InvalidRequest, AlreadyExists."""
        if spec.model is None:
            spec = spec.model_copy(update={"model": ctx.limits.default_model})
        assert spec.model is not None
        store = self._backend.tenant_store(ctx)
        self._validate(ctx, store, spec.model, spec.tools, spec.max_output_tokens)
        row = store.create_agent(spec.model_dump())
        store.append_audit(
            actor=ctx.principal,
            action="agent.create",
            target=row["id"],
            outcome="ok",
            detail={"name": spec.name, "model": spec.model},
        )
        return row

    def update(self, ctx: TenantContext, agent_id: str, patch: AgentPatch) -> AgentRecord:
        """Update an agent. Raises NotFound, UnknownModel, ModelNotAllowed, UnknownTool,
        IsolationRequired, InvalidRequest."""
        store = self._backend.tenant_store(ctx)
        values = patch.model_dump(exclude_unset=True)
        if not values:
            raise InvalidRequest("nothing to update")
        cleared = [k for k in ("name", "instructions", "model", "tools") if k in values and values[k] is None]
        if cleared:
            raise InvalidRequest(f"{', '.join(cleared)} cannot be null", field=cleared[0])
        merged: AnyRow = {**store.get_agent(agent_id), **values}
        self._validate(ctx, store, merged["model"], merged["tools"], merged["max_output_tokens"])
        row = store.update_agent(agent_id, values)
        store.append_audit(
            actor=ctx.principal,
            action="agent.update",
            target=agent_id,
            outcome="ok",
            detail={"fields": sorted(values)},
        )
        return row

    def delete(self, ctx: TenantContext, agent_id: str) -> None:
        """Delete an agent and its runs. Raises NotFound."""
        store = self._backend.tenant_store(ctx)
        store.delete_agent(agent_id)
        store.append_audit(
            actor=ctx.principal, action="agent.delete", target=agent_id, outcome="ok", detail={}
        )

    @staticmethod
    def _validate(
        ctx: TenantContext, store: TenantStore, model: str, tools: list[str], max_out: int | None
    ) -> None:
        key_name = provider_key_name(model)
        validate_model_id(model, tenant_key=key_name is not None and store.secrets().exists(key_name))
        check_model_allowed(model, ctx.limits, tenant_id=ctx.tenant_id)
        validate_tool_names(tools)
        check_tools_allowed(tools, ctx.limits.allowed_tools)
        check_tool_isolation(tools, ctx.isolation_level)
        if max_out is not None and max_out > ctx.limits.max_output_tokens_per_run:
            raise InvalidRequest(
                f"max_output_tokens {max_out} is above the plan's {ctx.limits.max_output_tokens_per_run}",
                field="max_output_tokens",
            )
