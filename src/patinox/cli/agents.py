"""``patinox agents`` (define a tenant's agents) and ``patinox run`` (run one once, in
this process)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from patinox.cli._deployment import ACTOR, DEFAULT_DATA_DIR, DataDir, open_runtime, resolve_tenant
from patinox.cli._output import Command, Group, cells, console, show
from patinox.errors import TenantSuspended
from patinox.runtime import Runtime
from patinox.tenancy import TenantContext

app = typer.Typer(cls=Group, no_args_is_help=True, help="Define a tenant's agents.")


def _tenant_context(rt: Runtime, ref: str) -> TenantContext:
    """The context CLI actions on tenant ``ref`` (id or name) run in: the CLI as principal,
    every tenant scope.

    Raises:
        TenantSuspended: the tenant is suspended.
        TenantNotFound: no such tenant.
    """
    row = rt.backend.get_tenant(resolve_tenant(rt, ref))
    if row["state"] == "suspended":
        raise TenantSuspended("this tenant is suspended", tenant_id=ref)
    return TenantContext.for_tenant(row, principal=ACTOR, scopes={"agents:write", "runs:write", "read"})


@app.command("create", cls=Command)
def agents_create(
    tenant_id: str,
    name: str,
    model: Annotated[
        str, typer.Option(help="simulated | simulated:instant | openai:NAME | anthropic:NAME")
    ] = "simulated",
    instructions: str = "",
    tool: Annotated[list[str] | None, typer.Option(help="built-in tool name (repeatable)")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Define an agent for a tenant."""
    from patinox.agents import is_simulated
    from patinox.api.schemas import AgentOut
    from patinox.control import AgentSpec

    spec = AgentSpec(name=name, model=model, instructions=instructions, tools=tool or [])
    rt = open_runtime(data_dir)
    row = rt.agents.create(_tenant_context(rt, tenant_id), spec)
    show(AgentOut.model_validate({**row, "simulated": is_simulated(row["model"])}))


@app.command("list", cls=Command)
def agents_list(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """List a tenant's agents."""
    rt = open_runtime(data_dir)
    table = Table("name", "model", "tools")
    table.add_column("id", no_wrap=True, min_width=29)
    for a in rt.backend.tenant_store(_tenant_context(rt, tenant_id)).list_agents():
        table.add_row(*cells(a["name"], a["model"], ",".join(a["tools"]), a["id"]))
    console.print(table)


_RUN_FIELDS = (
    "id",
    "status",
    "model",
    "simulated",
    "output",
    "input_tokens",
    "output_tokens",
    "tool_calls",
    "duration_ms",
)


def run(
    tenant_id: str,
    agent: Annotated[str, typer.Argument(help="agent id or name")],
    prompt: str,
    output_tokens: Annotated[int | None, typer.Option(min=1, help="output tokens to ask for")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Run a tenant's agent once, in this process, and print the run (a tool for operators).

    The run takes the tenant's limits, with one difference from the API: the request rate
    limit is counted in each server process only, so this run is not counted against a
    running server's request rate. Concurrent runs and the daily token budget are kept in
    the deployment's database and are shared with the server. For production traffic use
    the HTTP API (POST /v1/agents/{id}/runs).
    """
    from patinox.api.schemas import RunOut
    from patinox.control import RunRequest

    request = RunRequest(input=prompt, output_tokens=output_tokens)
    rt = open_runtime(data_dir)
    ctx = _tenant_context(rt, tenant_id)
    agents = {a["name"]: a["id"] for a in rt.backend.tenant_store(ctx).list_agents()}
    row = asyncio.run(rt.runs.start(ctx, agents.get(agent, agent), request))
    out = RunOut.model_validate({**row, "simulated": bool(row["simulated"])}).model_dump(mode="json")
    show({k: out[k] for k in _RUN_FIELDS})
