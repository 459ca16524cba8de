"""``patinox secrets``: set (or rotate), list and delete a tenant's secrets.

A value is read from standard input (piped) or a hidden prompt, never from an argument
(arguments show in ``ps`` and shell history), and is never printed back.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from patinox.cli._deployment import ACTOR, DEFAULT_DATA_DIR, DataDir, open_runtime, resolve_tenant
from patinox.cli._output import Command, Group, cells, console, fail, say, utc

app = typer.Typer(
    cls=Group, no_args_is_help=True, help="Set, list and delete a tenant's secrets (write-only)."
)


def _read_value() -> str:
    """The value: all of standard input when it is not a terminal (one trailing newline
    dropped), else a hidden prompt asked twice."""
    if not sys.stdin.isatty():
        value = sys.stdin.read()
        return value[:-1] if value.endswith("\n") else value
    value = typer.prompt("value", hide_input=True, confirmation_prompt=True)
    return str(value)


@app.command("set", cls=Command)
def secrets_set(
    tenant_id: Annotated[str, typer.Argument(help="tenant id or name")],
    name: Annotated[str, typer.Argument(help="the secret's name, e.g. provider:openai (BYOK)")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Set a secret, or rotate it to a new value; the value comes from standard input or a
    hidden prompt, never from the command line."""
    from patinox.control.secrets import SecretService

    value = _read_value()
    if not value:
        fail("no value given (pipe it on standard input, or type it at the prompt)")
    rt = open_runtime(data_dir)
    info, rotated = SecretService(rt.backend).put(resolve_tenant(rt, tenant_id), name, value, actor=ACTOR)
    say(f"Secret {info.name} {'rotated' if rotated else 'set'} (version {info.version}).")


@app.command("list", cls=Command)
def secrets_list(
    tenant_id: Annotated[str, typer.Argument(help="tenant id or name")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List a tenant's secrets: names, versions and dates, never values."""
    from patinox.control.secrets import SecretService

    rt = open_runtime(data_dir)
    table = Table("name", "version", "created", "updated")
    for info in SecretService(rt.backend).list(resolve_tenant(rt, tenant_id)):
        table.add_row(*cells(info.name, info.version, utc(info.created_at), utc(info.updated_at)))
    console.print(table)


@app.command("delete", cls=Command)
def secrets_delete(
    tenant_id: Annotated[str, typer.Argument(help="tenant id or name")],
    name: Annotated[str, typer.Argument(help="the secret's name")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Delete a tenant's secret."""
    from patinox.control.secrets import SecretService

    rt = open_runtime(data_dir)
    SecretService(rt.backend).delete(resolve_tenant(rt, tenant_id), name, actor=ACTOR)
    say(f"Secret {name} deleted.")
