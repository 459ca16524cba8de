"""``patinox conformance``: the isolation conformance suite, run against this installation."""

from __future__ import annotations

from typing import Annotated

import typer

from patinox.cli._output import say


def conformance(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            "--admin-url",
            envvar="PATINOX_CONFORMANCE_ADMIN_URL",
            help="PostgreSQL URL of a role that may create databases and roles (omit: SQLite only)",
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="sqlite-pool | sqlite-silo | pg-pool | pg-bridge | pg-silo (repeatable; default: all)"
        ),
    ] = None,
    examples: Annotated[
        int, typer.Option(min=1, help="random state-machine examples per storage model")
    ] = 30,
) -> None:
    """Run the isolation conformance suite against this installation.

    On PostgreSQL it creates a scratch database with an owner and an application role, runs
    every storage model there as the application role, and drops it all at the end. Prints
    one line per check and a closing line `N passed, M failed`; exits 1 if any failed.
    """
    from patinox.conformance import run_conformance

    result = run_conformance(admin_url=database_url, models=model or None, examples=examples, out=say)
    raise typer.Exit(0 if result.ok else 1)
