"""Layered configuration: each of a tenant's settings with the layer it comes from.

The layers, lowest first: the deployment's ``default`` (a :class:`ResourceLimits` field's
default), the tenant's ``plan`` (:data:`PLANS`), the ``tenant``'s own overrides
(:class:`LimitOverrides`, validated when written). :func:`layered_config` wraps the
models that enforce the limits rather than replacing them: its values are exactly
:func:`effective_limits`'s.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from patinox.tenancy.plans import LimitOverrides, ResourceLimits, effective_limits, get_plan

__all__ = ["Layer", "Setting", "TenantConfig", "layered_config"]

#: Where a setting's value comes from, lowest layer first.
Layer = Literal["default", "plan", "tenant"]


class Setting(BaseModel):
    """One setting's effective value and the layer it came from; ``description`` gives
    its unit."""

    model_config = ConfigDict(frozen=True)

    value: Any
    source: Layer
    description: str | None = None


class TenantConfig(BaseModel):
    """A tenant's effective configuration (``GET /v1/config``, ``patinox tenants config``)."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    plan: str
    isolation_level: Setting
    storage_model: Setting
    limits: dict[str, Setting] = Field(description="every limit, by name, with its layer")


def layered_config(
    tenant_id: str,
    plan: str,
    overrides: dict[str, Any] | None,
    *,
    isolation_level: str,
    storage_model: str,
) -> TenantConfig:
    """The tenant's settings, each with its layer.

    Args:
        tenant_id: the tenant.
        plan: its plan's name.
        overrides: its stored limit overrides (a :class:`LimitOverrides` dict).
        isolation_level, storage_model: chosen for the tenant when it was created or
            changed (layer ``tenant``).

    Raises:
        InvalidRequest: unknown plan.
    """
    effective = effective_limits(plan, overrides)
    planned = get_plan(plan).limits
    own = LimitOverrides.from_stored(overrides).model_dump(exclude_none=True)
    limits: dict[str, Setting] = {}
    for name, field in ResourceLimits.model_fields.items():
        source: Layer
        if name in own:
            source = "tenant"
        elif name in planned.model_fields_set:
            source = "plan"
        else:
            source = "default"
        limits[name] = Setting(value=getattr(effective, name), source=source, description=field.description)
    return TenantConfig(
        tenant_id=tenant_id,
        plan=plan,
        isolation_level=Setting(value=isolation_level, source="tenant"),
        storage_model=Setting(value=storage_model, source="tenant"),
        limits=limits,
    )
