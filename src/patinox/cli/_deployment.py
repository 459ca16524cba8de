"""The deployment a command acts on: ``--data-dir``, its :class:`~patinox.runtime.Runtime`
and tenants named by id or name."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patinox.cli._output import fail
from patinox.runtime import Runtime, Settings
from patinox.tenancy import looks_like_id

#: The actor recorded in audit records of CLI actions.
ACTOR = "cli"

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="PATINOX_DATA_DIR", help="deployment directory (SQLite file inside)"),
]
DEFAULT_DATA_DIR = Path(".patinox")


def open_runtime(data_dir: Path) -> Runtime:
    """The runtime of the deployment in ``data_dir`` (or named by ``PATINOX_DATABASE_URL``),
    its database migrated.

    Raises:
        typer.Exit: a SQLite deployment that ``patinox init`` has not created (after an
            ``error:`` line naming the command to run).
        StorageError: the database could not be opened or migrated.
    """
    settings = Settings.for_data_dir(data_dir)
    if settings.database_url.startswith("sqlite:///") and not (data_dir / "patinox.db").exists():
        fail(f"no deployment in {data_dir}; run `patinox init --data-dir {data_dir}` first")
    return Runtime.build(settings)


def resolve_tenant(rt: Runtime, ref: str) -> str:
    """A tenant id from ``ref``, an id (returned as it is) or a live tenant's name.

    Raises:
        typer.Exit: no live tenant has that name.
    """
    if looks_like_id(ref):
        return ref
    for t in rt.tenants.list():
        if t.name == ref:
            return str(t.id)
    fail(f"no live tenant named {ref!r}; `patinox tenants list` shows them")


def where(rt: Runtime, data_dir: Path) -> str:
    """What a deployment is, for messages: its data directory, or for PostgreSQL its
    database (password hidden) and the data directory."""
    url = rt.backend.engine.url
    if url.get_backend_name() == "sqlite":
        return str(data_dir)
    return f"{url.render_as_string(hide_password=True)} (data directory {data_dir})"
