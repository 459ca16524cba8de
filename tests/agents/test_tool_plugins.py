"""Tool plugins and the tenant's tool allow-list.

The plugin is a real distribution found through a real entry point: a ``.dist-info``
directory with ``entry_points.txt`` (group ``patinox.tools``) and its module, put on
``sys.path`` in a temporary directory, as ``pip install`` would leave them.

The allow-list (``allowed_tools``, plan then tenant override) is checked when an agent is
defined (403 ``tool_not_allowed``), when a run starts, and again when a queued run executes
after the list changed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from patinox.agents import BUILTIN_TOOLS, check_tools_allowed, known_tools
from patinox.agents.tools import TOOL_ENTRY_POINT_GROUP, refresh_tool_plugins, tool_plugins
from patinox.control import AgentSpec, RunRequest, TenantSpec, TenantUpdate
from patinox.errors import ToolNotAllowed
from patinox.runtime import Runtime
from patinox.tenancy import PLANS, LimitOverrides, Plan, TenantContext
from patinox.tenancy.config import layered_config
from patinox.tenancy.plans import _effective_limits
from tests.conftest import auth

_MODULE = '''
def shout(text: str) -> str:
    """Say a text louder.

    Args:
        text: what to say.
    """
    return text.upper() + "!"


async def whisper(text: str) -> str:
    """Say a text softly.

    Args:
        text: what to say.
    """
    return text.lower()


def explode(text: str) -> str:
    """Fail.

    Args:
        text: ignored.
    """
    raise RuntimeError("plugin bug")


not_a_tool = 42
'''

_ENTRY_POINTS = f"""[{TOOL_ENTRY_POINT_GROUP}]
shout = acme_patinox_tools:shout
whisper = acme_patinox_tools:whisper
explode = acme_patinox_tools:explode
calculator = acme_patinox_tools:shout
not_a_tool = acme_patinox_tools:not_a_tool
missing = acme_patinox_tools:no_such_name
"""


@pytest.fixture
def acme_plugin(tmp_path: Path) -> Iterator[Path]:
    """The ``acme-patinox-tools`` distribution installed on ``sys.path`` for the test."""
    site = tmp_path / "site"
    info = site / "acme_patinox_tools-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-patinox-tools\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(_ENTRY_POINTS)
    (site / "acme_patinox_tools.py").write_text(_MODULE)
    sys.path.insert(0, str(site))
    refresh_tool_plugins()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("acme_patinox_tools", None)
        refresh_tool_plugins()


def test_plugins_are_discovered_through_entry_points(acme_plugin: Path) -> None:
    plugins = tool_plugins()
    # A built-in's name is never taken over; an object that is not a function and an entry
    # point that does not load are left out.
    assert sorted(plugins) == ["explode", "shout", "whisper"]
    assert known_tools() == BUILTIN_TOOLS | {"explode", "shout", "whisper"}


def test_without_the_package_the_plugin_is_unknown(client: TestClient, make_tenant: Any) -> None:
    assert "shout" not in known_tools()
    t = make_tenant("no-plugin")
    r = client.post("/v1/agents", json={"name": "a", "tools": ["shout"]}, headers=t.h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_tool", r.text


def test_a_plugin_tool_runs_like_a_builtin(acme_plugin: Path, make_tenant: Any) -> None:
    t = make_tenant("plugin-user")
    agent = t.agent(tools=["shout", "whisper", "calculator"])
    r = t.run(
        agent,
        '/call shout {"text": "hello"}\n/call whisper {"text": "QUIET"}\n'
        '/call calculator {"expression": "6*7"}',
        output_tokens=60,
    )
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    assert "shout = HELLO! whisper = quiet calculator = 42" in out, out


def test_a_plugin_that_raises_fails_its_run_as_a_tool_error(acme_plugin: Path, make_tenant: Any) -> None:
    t = make_tenant("plugin-bug")
    r = t.run(t.agent(tools=["explode"]), '/call explode {"text": "x"}')
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "run_failed" and error["details"]["reason"] == "tool_error", error


def test_an_agent_naming_a_tool_off_the_list_is_refused_when_defined(
    acme_plugin: Path, client: TestClient, make_tenant: Any
) -> None:
    t = make_tenant("restricted", limits={"allowed_tools": ["calculator", "whisper"]})
    for tools in (["shout"], ["calculator", "shout"], ["python"]):
        r = client.post("/v1/agents", json={"name": "a", "tools": tools}, headers=t.h)
        assert r.status_code == 403, r.text
        error = r.json()["error"]
        assert error["code"] == "tool_not_allowed" and error["details"]["allowed"] == [
            "calculator",
            "whisper",
        ]
    r = client.post("/v1/agents", json={"name": "a", "tools": ["calculator"]}, headers=t.h)
    assert r.status_code == 201, r.text
    r = client.patch(f"/v1/agents/{r.json()['id']}", json={"tools": ["shout"]}, headers=t.h)
    assert r.status_code == 403 and r.json()["error"]["code"] == "tool_not_allowed", r.text
    # An unknown tool stays unknown, whatever the list.
    r = client.post("/v1/agents", json={"name": "b", "tools": ["nope"]}, headers=t.h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_tool", r.text
    # The layered configuration names the list and its layer.
    config = client.get("/v1/config", headers=t.h).json()
    assert config["limits"]["allowed_tools"] == {
        "value": ["calculator", "whisper"],
        "source": "tenant",
        "description": config["limits"]["allowed_tools"]["description"],
    }
    assert (
        config["limits"]["egress_hosts"]["value"] == []
        and config["limits"]["egress_hosts"]["source"] == "default"
    )


def test_a_run_is_refused_once_the_list_no_longer_has_its_tool(
    acme_plugin: Path, client: TestClient, operator_key: str, make_tenant: Any
) -> None:
    t = make_tenant("narrowed")
    agent = t.agent(tools=["shout"])
    assert t.run(agent, '/call shout {"text": "a"}').status_code == 200
    r = client.patch(
        f"/admin/tenants/{t.id}",
        json={"limits": {"allowed_tools": ["calculator"]}},
        headers=auth(operator_key),
    )
    assert r.status_code == 200, r.text
    runs_before = client.get(f"/v1/agents/{agent}/runs", headers=t.h).json()
    r = t.run(agent, '/call shout {"text": "a"}')
    assert r.status_code == 403 and r.json()["error"]["code"] == "tool_not_allowed", r.text
    assert client.get(f"/v1/agents/{agent}/runs", headers=t.h).json() == runs_before  # nothing stored


def test_a_queued_run_fails_when_its_tool_was_taken_away_meanwhile(
    acme_plugin: Path, runtime: Runtime
) -> None:
    tenant = runtime.tenants.create(TenantSpec(name="queued"), actor="test")
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=tenant.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    agent = runtime.agents.create(ctx, AgentSpec(name="a", model="simulated:instant", tools=["shout"]))
    queued = asyncio.run(
        runtime.runs.start(ctx, str(agent["id"]), RunRequest(input='/call shout {"text": "a"}', mode="async"))
    )
    runtime.tenants.update(
        tenant.id, TenantUpdate(limits=LimitOverrides(allowed_tools=("calculator",))), actor="test"
    )
    claim = runtime.queue.claim("w", lease_s=30)
    assert claim is not None and claim.run_id == queued["id"]
    done = asyncio.run(runtime.runs.execute_claim(claim))
    assert done is not None and done["status"] == "failed", done
    error = done["error"]
    assert error is not None and error["reason"] == ToolNotAllowed.code, error


def test_a_plans_list_applies_unless_the_tenant_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    free = PLANS["free"]
    narrow = Plan(
        name="narrow",
        weight=1,
        limits=free.limits.model_copy(update={"allowed_tools": ("calculator",)}),
    )
    monkeypatch.setitem(PLANS, "narrow", narrow)
    _effective_limits.cache_clear()
    try:
        planned = layered_config("tn_x", "narrow", {}, isolation_level="namespace", storage_model="pool")
        assert planned.limits["allowed_tools"].value == ("calculator",)
        assert planned.limits["allowed_tools"].source == "plan"
        own = layered_config(
            "tn_x",
            "narrow",
            {"allowed_tools": ["calculator", "shout"]},
            isolation_level="namespace",
            storage_model="pool",
        )
        assert own.limits["allowed_tools"].value == ("calculator", "shout")
        assert own.limits["allowed_tools"].source == "tenant"
        with pytest.raises(ToolNotAllowed):
            check_tools_allowed(["shout"], planned.limits["allowed_tools"].value)
    finally:
        _effective_limits.cache_clear()
