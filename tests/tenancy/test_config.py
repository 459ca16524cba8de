"""Layered configuration: every limit's value is the enforced one, and its layer is the
lowest that set it (deployment default < plan < tenant override)."""

from __future__ import annotations

import pytest

from patinox.errors import InvalidRequest
from patinox.tenancy import PLANS, ResourceLimits, effective_limits
from patinox.tenancy.config import layered_config


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_values_are_the_enforced_ones_and_layers_the_setters(plan: str) -> None:
    overrides = {"tokens_per_day": 1234, "cpu_weight": 7}
    config = layered_config("tn_x", plan, overrides, isolation_level="process", storage_model="pool")
    enforced = effective_limits(plan, overrides)
    assert set(config.limits) == set(ResourceLimits.model_fields)
    for name, setting in config.limits.items():
        assert setting.value == getattr(enforced, name), name
    assert config.limits["tokens_per_day"].source == "tenant"
    assert config.limits["cpu_weight"].source == "tenant"
    assert config.limits["requests_per_minute"].source == "plan"  # every plan sets it
    # Set by no plan: the deployment's default.
    assert config.limits["key_requests_per_minute"].source == "default"
    assert config.limits["dedicated_cores"].source == "default"
    assert config.limits["run_timeout_s"].description == "wall time of one run, seconds"
    assert (config.isolation_level.value, config.isolation_level.source) == ("process", "tenant")


def test_no_overrides_means_no_tenant_layer() -> None:
    config = layered_config("tn_x", "free", None, isolation_level="namespace", storage_model="silo")
    assert {s.source for s in config.limits.values()} == {"plan", "default"}


def test_an_override_above_its_bound_is_shown_as_enforced() -> None:
    # Stored by an older release above today's bound: enforced at the bound, shown so.
    config = layered_config(
        "tn_x", "free", {"max_agents": 10**9}, isolation_level="namespace", storage_model="pool"
    )
    assert config.limits["max_agents"].value == 1_000_000
    assert config.limits["max_agents"].source == "tenant"


def test_an_unknown_plan_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        layered_config("tn_x", "platinum", None, isolation_level="namespace", storage_model="pool")
