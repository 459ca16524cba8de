"""The ``patinox`` command line (Typer + Rich).

Operator commands act directly on the deployment's database (``--data-dir``, default
``$PATINOX_DATA_DIR`` or ``./.patinox``); ``replay`` and ``demo`` talk to a server over HTTP.

Every failure the user can cause (a Patinox error, an invalid spec, a missing file, a server
that cannot be reached) ends in ``error: <message>`` lines on stderr and exit code 1; bad
option values are refused by Typer itself (exit code 2). Text that comes from the user or
from an error is never read as Rich markup.

One module per command group: :mod:`~patinox.cli.serve` (``init``, ``serve``, ``demo``),
:mod:`~patinox.cli.worker` (``worker``, the queue worker), :mod:`~patinox.cli.agents`
(``agents``, ``run``), :mod:`~patinox.cli.tenants` and :mod:`~patinox.cli.transfer`
(``tenants``), :mod:`~patinox.cli.keys`, :mod:`~patinox.cli.replay`,
:mod:`~patinox.cli.conformance` and :mod:`~patinox.cli.doctor` (what this host can
enforce); output and errors in :mod:`patinox.cli._output`, the deployment a command acts on
in :mod:`patinox.cli._deployment`.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from patinox import __version__
from patinox.cli import agents, conformance, doctor, keys, replay, secrets, serve, tenants, worker
from patinox.cli._output import Command, Group, error_message, print_errors, say
from patinox.errors import PatinoxError

__all__ = ["app", "main"]

app = typer.Typer(
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    help="Patinox: a multi-tenant runtime for AI agents.",
)
app.add_typer(tenants.app, name="tenants")
app.add_typer(keys.app, name="keys")
app.add_typer(agents.app, name="agents")
app.add_typer(secrets.app, name="secrets")


def _show_version(value: bool) -> None:
    if value:
        say(f"patinox {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """Patinox: a multi-tenant runtime for AI agents."""


app.command(cls=Command)(serve.init)
app.command(cls=Command)(serve.serve)
app.command(cls=Command)(agents.run)
app.command(cls=Command)(worker.worker)
app.command(cls=Command)(conformance.conformance)
app.command("replay", cls=Command)(replay.replay_cmd)
app.command(cls=Command)(serve.demo)
app.command(cls=Command)(doctor.doctor)


def main() -> None:
    """Entry point: run the CLI; errors become ``error: <message>`` lines and exit code 1."""
    try:
        app()
    except PatinoxError as err:  # raised outside a command (the group prints the others)
        print_errors([error_message(err)])
        sys.exit(1)
