"""``patinox doctor``: what this host can enforce for each isolation level, one line each,
with the fix for what is missing."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from patinox.cli._output import console
from patinox.isolation.host import detect_host
from patinox.tenancy import IsolationLevel


def doctor(
    strict: Annotated[
        bool, typer.Option("--strict", help="exit with code 1 when any line is not ok")
    ] = False,
) -> None:
    """Show what this host can enforce: cgroups, tmpfs, bubblewrap, namespaces, free cores.

    Each line is probed for real (a cgroup, a tmpfs and a sandbox are created and removed).
    The isolation levels this host offers follow; a level it cannot enforce is refused when
    a tenant asks for it, never silently downgraded.
    """
    host = detect_host()
    table = Table("", "check", "detail", "fix")
    failed = 0
    for check in host.checks():
        failed += not check.ok
        table.add_row(
            Text("ok", style="green") if check.ok else Text("missing", style="red"),
            Text(check.name),
            Text(check.detail),
            Text(check.fix or ""),
        )
    console.print(table)
    levels = host.levels()
    offered = ", ".join(level.value for level in IsolationLevel if level in levels)
    console.print(Text(f"execution limits: {host.mechanism()}"))
    console.print(Text(f"isolation levels on this host: {offered}"))
    if strict and failed:
        raise typer.Exit(1)
