"""``patinox tenants``: create, list, show, config, update, suspend, resume and delete tenants;
export, import, move and rotate-key come from :mod:`patinox.cli.transfer`."""

from __future__ import annotations

import math
import typing
from typing import Annotated

import typer
from rich.table import Table

from patinox.cli import tls, transfer
from patinox.cli._deployment import ACTOR, DEFAULT_DATA_DIR, DataDir, open_runtime, resolve_tenant
from patinox.cli._output import Command, Group, cells, console, fail, say, show, utc
from patinox.control import EndpointUpdate, TenantSpec, TenantUpdate
from patinox.tenancy import PLANS, LimitOverrides

app = typer.Typer(cls=Group, no_args_is_help=True, help="Create and manage tenants.")


def _limit_kinds() -> dict[str, type]:
    """Limit name -> ``int``, ``float``, ``str`` (``default_model``) or ``tuple`` (a list
    setting: ``allowed_models``, ``allowed_tools``, ``egress_hosts``), from
    :class:`~patinox.tenancy.LimitOverrides`."""
    kinds: dict[str, type] = {}
    for name, field in LimitOverrides.model_fields.items():
        args = typing.get_args(field.annotation)
        lists = any(typing.get_origin(a) is tuple for a in args)
        text = any(a is str or str in typing.get_args(a) for a in args)
        kinds[name] = tuple if lists else str if text else float if float in args else int
    return kinds


LIMIT_NAMES = ", ".join(LimitOverrides.model_fields)
LIMIT_HELP = f"override a plan limit, NAME=VALUE (repeatable); NAME is one of: {LIMIT_NAMES}"


def _limit_value(name: str, kind: type, text: str) -> int | float:
    """``text`` as a limit value; integer limits take ``1e6`` when it is a whole number."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        fail(f"--limit {name}: needs a number, got {text!r}")
    if not math.isfinite(number):
        fail(f"--limit {name}: needs a finite number, got {text!r}")
    if kind is int:
        if not number.is_integer():
            fail(f"--limit {name}: must be a whole number, got {text!r}")
        return int(number)
    return number


def _limits(pairs: list[str]) -> dict[str, object]:
    """``--limit NAME=VALUE`` pairs as a LimitOverrides dict (spaces around parts ignored;
    a list setting takes names separated by commas or spaces, ``NAME=`` for an empty list,
    ``allowed_models`` patterns separated by spaces only: ``--limit "allowed_models=simulated*
    openai:*"``; ``default_model`` takes a model id)."""
    kinds = _limit_kinds()
    out: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep:
            fail(f"--limit takes NAME=VALUE, got {pair!r}")
        if name not in kinds:
            fail(f"--limit {name}: unknown limit; valid names: {LIMIT_NAMES}")
        if kinds[name] is tuple:
            # Model patterns may hold commas (simulated:ttft_ms=1,tpot_ms=1): spaces only.
            parts = value.split() if name == "allowed_models" else value.replace(",", " ").split()
            out[name] = [v for v in parts if v]
            continue
        if kinds[name] is str:
            out[name] = value
            continue
        out[name] = _limit_value(name, kinds[name], value)
    return out


@app.command("create", cls=Command)
def tenants_create(
    name: str,
    plan: Annotated[str, typer.Option(help=" | ".join(PLANS))] = "free",
    isolation_level: Annotated[
        str, typer.Option(help="namespace (others need their executors)")
    ] = "namespace",
    limit: Annotated[list[str] | None, typer.Option(help=LIMIT_HELP)] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create a tenant."""
    spec = TenantSpec.model_validate(
        {
            "name": name,
            "plan": plan,
            "isolation_level": isolation_level,
            "limits": _limits(limit or []),
        }
    )
    rt = open_runtime(data_dir)
    show(rt.tenants.create(spec, actor=ACTOR))


@app.command("list", cls=Command)
def tenants_list(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    all_: Annotated[bool, typer.Option("--all", help="include deleted tenants (tombstones)")] = False,
) -> None:
    """List tenants."""
    rt = open_runtime(data_dir)
    table = Table("name", "plan", "state", "isolation", "storage", "created")
    table.add_column("id", no_wrap=True, min_width=29)
    for t in rt.tenants.list(include_deleted=all_):
        table.add_row(
            *cells(
                t.name,
                t.plan,
                t.state.value,
                t.isolation_level.value,
                t.storage_model.value,
                utc(t.created_at),
                t.id,
            )
        )
    console.print(table)


@app.command("show", cls=Command)
def tenants_show(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Show one tenant with its effective limits."""
    rt = open_runtime(data_dir)
    show(rt.tenants.get(resolve_tenant(rt, tenant_id)))


@app.command("endpoint", cls=Command)
def tenants_endpoint(
    tenant_id: str,
    slug: Annotated[str | None, typer.Option(help="set the tenant's slug (its <slug>.<base domain>)")] = None,
    domain: Annotated[
        list[str] | None, typer.Option(help="set the tenant's custom domains (repeatable; the whole list)")
    ] = None,
    no_domains: Annotated[bool, typer.Option("--no-domains", help="remove every custom domain")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Show a tenant's endpoint (slug, custom domains, host names), or set its slug and
    custom domains; a name given up is held back from other tenants for the quarantine."""
    rt = open_runtime(data_dir)
    tid = resolve_tenant(rt, tenant_id)
    assert rt.endpoints is not None
    if slug is None and domain is None and not no_domains:
        show(rt.endpoints.get(tid))
        return
    domains = [] if no_domains else domain
    show(rt.endpoints.update(tid, EndpointUpdate(slug=slug, domains=domains), actor=ACTOR))


@app.command("config", cls=Command)
def tenants_config(
    tenant_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Show each of a tenant's settings, its effective value and the layer it comes from
    (default < plan < tenant)."""
    rt = open_runtime(data_dir)
    config = rt.tenants.config(resolve_tenant(rt, tenant_id))
    if as_json:
        show(config)
        return
    table = Table(
        "setting", "value", "from", "unit / meaning", title=f"{config.tenant_id} (plan {config.plan})"
    )
    settings = {
        "isolation_level": config.isolation_level,
        "storage_model": config.storage_model,
        **config.limits,
    }
    for name, setting in settings.items():
        value = setting.value
        shown = " ".join(value) if isinstance(value, tuple | list) else value  # allowed_models
        table.add_row(*cells(name, shown, setting.source, setting.description or ""))
    console.print(table)


@app.command("update", cls=Command)
def tenants_update(
    tenant_id: str,
    plan: Annotated[str | None, typer.Option(help=f"new plan: {' | '.join(PLANS)}")] = None,
    limit: Annotated[list[str] | None, typer.Option(help=f"{LIMIT_HELP}; replaces all overrides")] = None,
    isolation_level: Annotated[
        str | None,
        typer.Option(
            help="move the tenant to this isolation level live (namespace | process | container | "
            "dedicated, as this host offers): new runs wait, runs in flight drain, then the new "
            "level takes over"
        ),
    ] = None,
    drain_timeout: Annotated[
        float | None,
        typer.Option(
            help="with --isolation-level: seconds to wait for runs in flight before cancelling "
            "them (default and most: the plan's run timeout)"
        ),
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a tenant's plan, limit overrides or isolation level."""
    if plan is None and limit is None and isolation_level is None:
        fail("nothing to update: give --plan, --limit and/or --isolation-level")
    if drain_timeout is not None and isolation_level is None:
        fail("--drain-timeout goes with --isolation-level")
    change = TenantUpdate.model_validate(
        {
            "plan": plan,
            "limits": _limits(limit) if limit is not None else None,
            "isolation_level": isolation_level,
            "drain_timeout_s": drain_timeout,
        }
    )
    rt = open_runtime(data_dir)
    show(rt.tenants.update(resolve_tenant(rt, tenant_id), change, actor=ACTOR))


@app.command("suspend", cls=Command)
def tenants_suspend(tenant_id: str, reason: str = "", data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Suspend a tenant: data kept, every call refused."""
    rt = open_runtime(data_dir)
    show(rt.tenants.suspend(resolve_tenant(rt, tenant_id), actor=ACTOR, reason=reason))


@app.command("resume", cls=Command)
def tenants_resume(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Resume a suspended tenant."""
    rt = open_runtime(data_dir)
    show(rt.tenants.resume(resolve_tenant(rt, tenant_id), actor=ACTOR))


@app.command("delete", cls=Command)
def tenants_delete(
    tenant_id: str,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Delete a tenant and everything it owns (irreversible)."""
    rt = open_runtime(data_dir)
    tenant_id = resolve_tenant(rt, tenant_id)
    tenant = rt.tenants.get(tenant_id)
    if not yes:
        typer.confirm(f"Delete tenant {tenant.name} ({tenant_id}) and all its data?", abort=True)
    counts = rt.tenants.delete(tenant_id, actor=ACTOR)
    say(f"Deleted {tenant_id}; rows purged: {counts}")


app.command("export", cls=Command)(transfer.tenants_export)
app.command("import", cls=Command)(transfer.tenants_import)
app.command("move", cls=Command)(transfer.tenants_move)
app.command("rotate-key", cls=Command)(transfer.tenants_rotate_key)
app.add_typer(tls.app, name="tls")
