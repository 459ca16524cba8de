"""The ``patinox`` command line (Typer + Rich).

Operator commands act directly on the deployment's database (``--data-dir``, default
``$PATINOX_DATA_DIR`` or ``./.patinox``); ``replay`` and ``demo`` talk to a server over HTTP.

Every failure the user can cause (a Patinox error, an invalid spec, a missing file, a server
that cannot be reached) ends in ``error: <message>`` lines on stderr and exit code 1; bad
option values are refused by Typer itself (exit code 2). Text that comes from the user or
from an error is never read as Rich markup.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails, to_jsonable_python
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from patinox import __version__
from patinox.errors import ConfigurationError, NotFound, PatinoxError, StorageError
from patinox.replay import ReplayBounds
from patinox.tenancy import PLANS, LimitOverrides

if typing.TYPE_CHECKING:
    from patinox.runtime import Runtime

ACTOR = "cli"

# Tables are wide; when output is not a terminal (CI logs, pipes) do not squeeze them to 80.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


# --- errors ----------------------------------------------------------------------------


def _print_errors(lines: Iterable[str]) -> None:
    """Print ``error: <line>`` for each line; the text is never read as markup."""
    for line in lines:
        err_console.print(Text.assemble(("error:", "red"), " ", line), soft_wrap=True)


def _error_message(err: PatinoxError) -> str:
    """``err``'s message for the operator's terminal: a :class:`StorageError` adds the first
    line of the driver's own message (e.g. ``role "patinox_owner" does not exist``), which
    the HTTP API keeps to itself (a tenant must not see the database's details)."""
    cause = err.__cause__
    if not isinstance(err, StorageError) or cause is None:
        return err.message
    driver = getattr(cause, "orig", None) or cause
    detail = next((line.strip() for line in str(driver).splitlines() if line.strip()), "")
    return f"{err.message}: {detail}" if detail else err.message


def _fail(message: str, code: int = 1) -> NoReturn:
    _print_errors([message])
    raise typer.Exit(code)


#: Spec fields named as the CLI spells them (an option or an argument).
_CLI_NAMES = {
    "plan": "--plan",
    "isolation_level": "--isolation-level",
    "storage_model": "--storage-model",
    "model": "--model",
    "instructions": "--instructions",
    "tools": "--tool",
    "output_tokens": "--output-tokens",
    "input": "PROMPT",
}

#: Regular expressions of spec fields, said in words.
_PATTERN_WORDS = {
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*$": "use letters, digits, '_', '.' and '-', starting with a letter or digit",
}


def _problem(e: ErrorDetails) -> str:
    """One pydantic error as a short phrase, e.g. ``must be >= 1``."""
    ctx: dict[str, Any] = dict(e.get("ctx") or {})
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    kind = e["type"]
    if kind in bounds and bounds[kind][1] in ctx:
        op, key = bounds[kind]
        return f"must be {op} {ctx[key]}"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return _PATTERN_WORDS.get(pattern, f"must match {pattern}")
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "string_too_long" and "max_length" in ctx:
        return f"at most {ctx['max_length']} characters"
    return e["msg"].replace("Input should be", "must be")


def _validation_lines(err: ValidationError) -> list[str]:
    """One line per problem, each named by the option or argument that carries it."""
    lines = []
    for e in err.errors():
        loc = [str(part) for part in e["loc"]]
        if not loc:
            lines.append(_problem(e))
            continue
        if loc[0] == "limits":
            where = " ".join(["--limit", *loc[1:2]])
        elif loc[0] in _CLI_NAMES:
            where = _CLI_NAMES[loc[0]]
        else:
            where = ".".join(loc)
        lines.append(f"{where}: {_problem(e)}")
    return lines


def _os_error_message(err: OSError) -> str:
    reason = err.strerror or str(err) or type(err).__name__
    return f"{reason}: {err.filename}" if err.filename else reason


def _reflow(help_text: str | None) -> str | None:
    """A docstring's paragraphs each on one line, so Rich wraps them to the terminal
    (Typer keeps the line breaks of every paragraph after the first)."""
    if not help_text:
        return help_text
    paragraphs = inspect.cleandoc(help_text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


class _PlainFlagsCommand(TyperCommand):
    """A command with plain flags and reflowed paragraphs in ``--help``.

    Typer's Rich help prints a ``<bool>`` type after every flag (``--help`` included); a
    flag takes no value, so its type column is left empty.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class _Group(TyperGroup):
    """A command group with plain flags in ``--help`` and one error printer.

    Every :class:`~patinox.errors.PatinoxError`, pydantic ``ValidationError`` and
    ``OSError`` raised by a subcommand ends as ``error: <message>`` lines and exit code 1.
    """

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except PatinoxError as err:
            _fail(_error_message(err))
        except ValidationError as err:
            _print_errors(_validation_lines(err))
            raise typer.Exit(1) from None
        except OSError as err:
            _fail(_os_error_message(err))


def _plain_flags(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_bool_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    help="Patinox: a multi-tenant runtime for AI agents.",
)
tenants_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Create and manage tenants.")
keys_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Create and revoke API keys.")
agents_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Define a tenant's agents.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(agents_app, name="agents")
_Command = _PlainFlagsCommand

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="PATINOX_DATA_DIR", help="deployment directory (SQLite file inside)"),
]
DEFAULT_DATA_DIR = Path(".patinox")


def _runtime(data_dir: Path) -> Any:
    """The runtime of the deployment in ``data_dir`` (or named by ``PATINOX_DATABASE_URL``)."""
    from patinox.runtime import Runtime, Settings

    settings = Settings.for_data_dir(data_dir)
    if settings.database_url.startswith("sqlite:///") and not (data_dir / "patinox.db").exists():
        _fail(f"no deployment in {data_dir}; run `patinox init --data-dir {data_dir}` first")
    return Runtime.build(settings)


def _tenant_id(rt: Any, ref: str) -> str:
    """A tenant id from an id or a live tenant's name."""
    from patinox.tenancy import looks_like_id

    if looks_like_id(ref):
        return ref
    for t in rt.tenants.list():
        if t.name == ref:
            return str(t.id)
    _fail(f"no live tenant named {ref!r}; `patinox tenants list` shows them")


def _limit_kinds() -> dict[str, type]:
    """Limit name -> ``int`` or ``float``, from :class:`~patinox.tenancy.LimitOverrides`."""
    return {
        name: float if float in typing.get_args(field.annotation) else int
        for name, field in LimitOverrides.model_fields.items()
    }


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
        _fail(f"--limit {name}: needs a number, got {text!r}")
    if not math.isfinite(number):
        _fail(f"--limit {name}: needs a finite number, got {text!r}")
    if kind is int:
        if not number.is_integer():
            _fail(f"--limit {name}: must be a whole number, got {text!r}")
        return int(number)
    return number


def _limits(pairs: list[str]) -> dict[str, Any]:
    """``--limit NAME=VALUE`` pairs as a LimitOverrides dict (spaces around parts ignored)."""
    kinds = _limit_kinds()
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep:
            _fail(f"--limit takes NAME=VALUE, got {pair!r}")
        if name not in kinds:
            _fail(f"--limit {name}: unknown limit; valid names: {LIMIT_NAMES}")
        out[name] = _limit_value(name, kinds[name], value)
    return out


def _show(data: BaseModel | dict[str, Any]) -> None:
    """Print ``data`` as JSON, serialised the way the HTTP API does (timestamps ``...Z``)."""
    payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else to_jsonable_python(data)
    console.print_json(json.dumps(payload))


def _say(message: str) -> None:
    """Print a line of plain text (never read as markup)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _cells(*values: object) -> list[Text]:
    """Table cells that show their text as it is (no markup)."""
    return [Text(str(v)) for v in values]


def _show_version(value: bool) -> None:
    if value:
        _say(f"patinox {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """Patinox: a multi-tenant runtime for AI agents."""


@app.command(cls=_Command)
def init(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    key_file: Annotated[
        Path | None,
        typer.Option(help="write the operator key here (mode 0600) instead of printing it"),
    ] = None,
) -> None:
    """Create a deployment: its database (migrated) and the first operator key.

    The deployment directory is created with mode 0700 and the database file gets mode 0600:
    they hold key hashes and every tenant's data.
    """
    from patinox.runtime import Runtime

    created = not data_dir.exists()
    rt = Runtime.initialise(data_dir)
    if created:
        data_dir.chmod(0o700)
    db = data_dir / "patinox.db"
    if db.exists():
        db.chmod(0o600)
    if rt.backend.list_api_keys(None):
        _fail(
            f"{_where(rt, data_dir)} is already initialised; create more operator keys with "
            "`patinox keys create --operator`"
        )
    issued = rt.keys.create(tenant_id=None, name="operator", scopes=None, actor=ACTOR)
    if key_file is not None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        with os.fdopen(fd, "w") as fh:
            fh.write(issued.secret + "\n")
        _say(f"Initialised {_where(rt, data_dir)}; operator key written to {key_file} (mode 0600).")
    else:
        _say(f"Initialised {_where(rt, data_dir)}. Operator key (shown once, store it now):")
        _say(issued.secret)


def _where(rt: Runtime, data_dir: Path) -> str:
    """What a deployment is, for messages: its data directory, or for PostgreSQL its
    database (password hidden) and the data directory."""
    url = rt.backend.engine.url
    if url.get_backend_name() == "sqlite":
        return str(data_dir)
    return f"{url.render_as_string(hide_password=True)} (data directory {data_dir})"


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear message unless ``host:port`` can be bound (as uvicorn will)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        _fail(f"cannot bind {host}: {err.strerror}; give an address with --host")
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                _fail(f"port {port} is in use; choose another with --port")
            _fail(f"cannot bind {host}:{port}: {err.strerror or err}")


@app.command(cls=_Command)
def serve(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn's own log level (start-up, errors)")] = "warning",
) -> None:
    """Run the HTTP API server until interrupted.

    Every request is logged as one JSON line on stderr (PATINOX_LOG_LEVEL: debug, info,
    warning, error; default info).
    """
    import uvicorn

    from patinox._logs import configure_logging
    from patinox._process import server_gc
    from patinox.api import create_app

    configure_logging()

    app_ = create_app(runtime=_runtime(data_dir))
    _check_port_free(host, port)
    _say(f"Patinox serving {_where(app_.state.runtime, data_dir)} on http://{host}:{port} (docs at /docs)")
    # The start-up heap frozen and the collector's thresholds set for a server (see
    # patinox._process); as they were again when the server stops.
    with server_gc():
        # reset_contextvars: each request starts from a clean context (see clear_inherited_tenant).
        # While the fair share is on, the loop takes ready callbacks by tenant in turn
        # (patinox.limits.fair_loop); off, it is asyncio's own.
        fair = app_.state.runtime.settings.admission.enabled
        loop = "patinox.limits.fair_loop:new_event_loop" if fair else "asyncio"
        uvicorn.run(
            app_,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            reset_contextvars=True,
            loop=loop,
        )


# --- tenants ---------------------------------------------------------------------------


@tenants_app.command("create", cls=_Command)
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
    from patinox.control import TenantSpec

    spec = TenantSpec.model_validate(
        {
            "name": name,
            "plan": plan,
            "isolation_level": isolation_level,
            "limits": _limits(limit or []),
        }
    )
    rt = _runtime(data_dir)
    _show(rt.tenants.create(spec, actor=ACTOR))


def _utc(value: Any) -> str:
    """A timestamp for a table cell: UTC, to the second, like the JSON (``...Z``)."""
    return f"{value.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


@tenants_app.command("list", cls=_Command)
def tenants_list(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    all_: Annotated[bool, typer.Option("--all", help="include deleted tenants (tombstones)")] = False,
) -> None:
    """List tenants."""
    rt = _runtime(data_dir)
    table = Table("name", "plan", "state", "isolation", "storage", "created")
    table.add_column("id", no_wrap=True, min_width=29)
    for t in rt.tenants.list(include_deleted=all_):
        table.add_row(
            *_cells(
                t.name,
                t.plan,
                t.state.value,
                t.isolation_level.value,
                t.storage_model.value,
                _utc(t.created_at),
                t.id,
            )
        )
    console.print(table)


@tenants_app.command("show", cls=_Command)
def tenants_show(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Show one tenant with its effective limits."""
    rt = _runtime(data_dir)
    _show(rt.tenants.get(_tenant_id(rt, tenant_id)))


@tenants_app.command("update", cls=_Command)
def tenants_update(
    tenant_id: str,
    plan: Annotated[str | None, typer.Option(help=f"new plan: {' | '.join(PLANS)}")] = None,
    limit: Annotated[list[str] | None, typer.Option(help=f"{LIMIT_HELP}; replaces all overrides")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a tenant's plan or limit overrides."""
    from patinox.control import TenantUpdate

    if plan is None and limit is None:
        _fail("nothing to update: give --plan and/or --limit")
    change = TenantUpdate.model_validate(
        {"plan": plan, "limits": _limits(limit) if limit is not None else None}
    )
    rt = _runtime(data_dir)
    _show(rt.tenants.update(_tenant_id(rt, tenant_id), change, actor=ACTOR))


@tenants_app.command("suspend", cls=_Command)
def tenants_suspend(tenant_id: str, reason: str = "", data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Suspend a tenant: data kept, every call refused."""
    rt = _runtime(data_dir)
    _show(rt.tenants.suspend(_tenant_id(rt, tenant_id), actor=ACTOR, reason=reason))


@tenants_app.command("resume", cls=_Command)
def tenants_resume(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Resume a suspended tenant."""
    rt = _runtime(data_dir)
    _show(rt.tenants.resume(_tenant_id(rt, tenant_id), actor=ACTOR))


@tenants_app.command("delete", cls=_Command)
def tenants_delete(
    tenant_id: str,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Delete a tenant and everything it owns (irreversible)."""
    rt = _runtime(data_dir)
    tenant_id = _tenant_id(rt, tenant_id)
    tenant = rt.tenants.get(tenant_id)
    if not yes:
        typer.confirm(f"Delete tenant {tenant.name} ({tenant_id}) and all its data?", abort=True)
    counts = rt.tenants.delete(tenant_id, actor=ACTOR)
    _say(f"Deleted {tenant_id}; rows purged: {counts}")


@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar; yields ``update(done, total)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _secret(passphrase_env: str | None, passphrase_file: Path | None, *, confirm: bool) -> str | None:
    """The bundle passphrase from an environment variable, a file, or a hidden prompt."""
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            _fail(f"environment variable {passphrase_env} is empty or unset")
        return value
    if passphrase_file is not None:
        return passphrase_file.read_text().rstrip("\n")
    return str(typer.prompt("Bundle passphrase", hide_input=True, confirmation_prompt=confirm))


PassEnv = Annotated[
    str | None, typer.Option(help="read the bundle passphrase from this environment variable")
]
PassFile = Annotated[Path | None, typer.Option(help="read the bundle passphrase from this file")]


def _storage_model(value: str) -> Any:
    """The StorageModel named ``value``, or a one-line error listing the valid names."""
    from patinox.tenancy import StorageModel

    try:
        return StorageModel(value.lower())
    except ValueError:
        _fail(f"unknown storage model {value!r}; use one of: {', '.join(m.value for m in StorageModel)}")


@tenants_app.command("export", cls=_Command)
def tenants_export(
    tenant_id: str,
    path: Path,
    recipient: Annotated[
        Path | None, typer.Option(help="seal for this X25519 public key (PEM) instead of a passphrase")
    ] = None,
    passphrase_env: PassEnv = None,
    passphrase_file: PassFile = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing file")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Write an encrypted bundle of everything a tenant owns (mode 0600).

    The bundle is sealed with its own passphrase or recipient key, not with the deployment's
    keys: it stays readable after the tenant is deleted, so guard it like a backup.
    """
    from patinox.control.transfer import export_tenant

    if path.exists() and not overwrite:
        _fail(f"{path} exists; choose another path or pass --overwrite")
    rt = _runtime(data_dir)
    tid = _tenant_id(rt, tenant_id)
    public = recipient.read_bytes() if recipient is not None else None
    secret = None if public is not None else _secret(passphrase_env, passphrase_file, confirm=True)
    with _progress_bar("exporting") as update:
        summary = export_tenant(
            rt.backend,
            tid,
            path,
            passphrase=secret,
            recipient_public_key=public,
            progress=update,
            overwrite=overwrite,
        )
    _say(
        f"Exported tenant {summary.tenant_name} ({tid}) to {path}: {summary.records} records, "
        f"{summary.size_bytes} bytes, sealed with a {summary.protection}."
    )


@tenants_app.command("import", cls=_Command)
def tenants_import(
    path: Path,
    name: Annotated[
        str | None, typer.Option(help="name of the new tenant (default: the exported name)")
    ] = None,
    storage_model: Annotated[
        str | None, typer.Option(help="pool | bridge | silo (default: as exported)")
    ] = None,
    identity: Annotated[
        Path | None, typer.Option(help="X25519 private key (PEM) the bundle was sealed for")
    ] = None,
    passphrase_env: PassEnv = None,
    passphrase_file: PassFile = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create a tenant (new id, new keys) from a bundle; integrity is checked before any write,
    and a failed import leaves nothing behind."""
    from patinox.control.transfer import import_tenant

    rt = _runtime(data_dir)
    private = identity.read_bytes() if identity is not None else None
    secret = None if private is not None else _secret(passphrase_env, passphrase_file, confirm=False)
    model = _storage_model(storage_model) if storage_model else None
    # Progress is in bundle bytes, counted twice: once to verify the whole bundle, once to write it.
    with _progress_bar("verifying, then importing") as update:
        tenant = import_tenant(
            rt.backend,
            path,
            passphrase=secret,
            recipient_private_key=private,
            name=name,
            storage_model=model,
            actor=ACTOR,
            progress=update,
            manager=rt.tenants,
        )
    _say(
        f"Imported as tenant {tenant.name} ({tenant.id}); "
        f"issue it keys with `patinox keys create {tenant.id}`."
    )


@tenants_app.command("move", cls=_Command)
def tenants_move(
    tenant_id: str,
    to: Annotated[str, typer.Option(help="pool | bridge | silo")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Move a tenant to another storage model online: reads go on, writes are held briefly,
    the old copy is removed after the switch."""
    from patinox.control.transfer import move_tenant

    rt = _runtime(data_dir)
    tid = _tenant_id(rt, tenant_id)
    with _progress_bar("moving") as update:
        summary = move_tenant(rt.backend, tid, _storage_model(to), actor=ACTOR, progress=update)
    copied = sum(summary.rows.values())
    if summary.from_model is summary.to_model:
        _say(
            f"Tenant {tid} is already on {summary.to_model.value}: nothing moved "
            "(any copy an interrupted move left elsewhere was removed)."
        )
        return
    _say(
        f"Moved {tid} from {summary.from_model.value} to {summary.to_model.value}: {copied} rows copied "
        f"and verified, old copy removed, {summary.duration_s:.1f} s."
    )


@tenants_app.command("rotate-key", cls=_Command)
def tenants_rotate_key(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Give a tenant a new data key (DEK) and re-encrypt its payloads under it."""
    rt = _runtime(data_dir)
    tid = _tenant_id(rt, tenant_id)
    key = rt.backend.keyring.rotate_dek(tid)
    with _progress_bar("re-encrypting") as update:
        n = rt.backend.acting_on(tid).reencrypt(progress=update)
    rt.backend.acting_on(tid).append_audit(
        actor=ACTOR,
        action="tenant.rotate_dek",
        target=tid,
        outcome="ok",
        detail={"version": key.version, "rows": n},
    )
    _say(f"Tenant {tid} now uses DEK version {key.version}; {n} payloads re-encrypted.")


# --- keys ------------------------------------------------------------------------------


def _key_out(row: dict[str, Any]) -> BaseModel:
    from patinox.api.schemas import KeyOut

    return KeyOut(**row)


@keys_app.command("create", cls=_Command)
def keys_create(
    tenant_id: Annotated[str | None, typer.Argument(help="tenant id or name (omit with --operator)")] = None,
    name: Annotated[str, typer.Option(help="a label for the key")] = "default",
    scope: Annotated[
        list[str] | None, typer.Option(help="agents:write | runs:write | read (repeatable)")
    ] = None,
    operator: Annotated[bool, typer.Option("--operator", help="an operator (admin) key")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create an API key; the secret is printed once."""
    if operator and tenant_id is not None:
        _fail("--operator creates an operator key and takes no TENANT_ID")
    if not operator and tenant_id is None:
        _fail("give a TENANT_ID, or --operator for an operator key")
    rt = _runtime(data_dir)
    tid = _tenant_id(rt, tenant_id) if tenant_id is not None else None
    issued = rt.keys.create(tenant_id=tid, name=name, scopes=scope, actor=ACTOR)
    _show(_key_out(issued.record))
    _say("Key (shown once, store it now):")
    _say(issued.secret)


@keys_app.command("list", cls=_Command)
def keys_list(
    tenant_id: Annotated[
        str | None, typer.Argument(help="tenant id or name (omit for operator keys)")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List a tenant's keys (operator keys when no tenant is given)."""
    rt = _runtime(data_dir)
    table = Table("prefix", "name", "scopes", "revoked")
    table.add_column("id", no_wrap=True, min_width=30)
    for k in rt.backend.list_api_keys(_tenant_id(rt, tenant_id) if tenant_id else None):
        table.add_row(
            *_cells(k["prefix"], k["name"], ",".join(k["scopes"]), "yes" if k["revoked_at"] else "", k["id"])
        )
    console.print(table)


@keys_app.command("rotate-kek", cls=_Command)
def keys_rotate_kek(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Add a new key-encryption key (KEK) version and re-wrap every tenant's DEKs under it.

    Payloads are not touched: only the wrapped form of each DEK changes. Old KEK versions
    stay in the key file so a re-wrap interrupted half way can simply be run again.
    """
    from patinox.storage.crypto import FileKeyProvider

    rt = _runtime(data_dir)
    provider = rt.backend.keyring.provider
    if not isinstance(provider, FileKeyProvider):
        _fail("KEK rotation here needs a file key provider; rotate a KMS key in the KMS")
    version = provider.rotate()
    tenants = [t.id for t in rt.tenants.list()]
    with _progress_bar("re-wrapping") as update:
        n = 0
        for i, tid in enumerate(tenants, 1):
            n += rt.backend.keyring.rewrap_all([tid])
            update(i, len(tenants))
    rt.backend.append_operator_audit(
        actor=ACTOR, action="kek.rotate", target=None, outcome="ok", detail={"version": version, "deks": n}
    )
    _say(f"KEK version {version} is current; {n} DEKs re-wrapped.")


def _key_tenant(rt: Any, key_id: str) -> str | None:
    """The tenant id of key ``key_id`` (``None`` for an operator key); key ids are unique
    across the deployment.

    Raises:
        NotFound: no live tenant and no operator has that key.
    """
    if any(k["id"] == key_id for k in rt.backend.list_api_keys(None)):
        return None
    for t in rt.tenants.list():
        if any(k["id"] == key_id for k in rt.backend.list_api_keys(t.id)):
            return str(t.id)
    raise NotFound(f"api key {key_id!r} not found", key_id=key_id)


@keys_app.command("revoke", cls=_Command)
def keys_revoke(
    key_id: str,
    tenant: Annotated[
        str | None, typer.Option(help="the key's tenant id or name (default: found from the key id)")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Revoke a key; it is refused from the next request on."""
    rt = _runtime(data_dir)
    tenant_id = _tenant_id(rt, tenant) if tenant else _key_tenant(rt, key_id)
    _show(_key_out(rt.keys.revoke(key_id, tenant_id=tenant_id, actor=ACTOR)))


# --- agents and runs ------------------------------------------------------------------


def _cli_context(rt: Any, tenant_id: str) -> Any:
    from patinox.errors import TenantSuspended
    from patinox.tenancy import TenantContext

    row = rt.backend.get_tenant(_tenant_id(rt, tenant_id))
    if row["state"] == "suspended":
        raise TenantSuspended("this tenant is suspended", tenant_id=tenant_id)
    return TenantContext.for_tenant(row, principal=ACTOR, scopes={"agents:write", "runs:write", "read"})


@agents_app.command("create", cls=_Command)
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
    rt = _runtime(data_dir)
    row = rt.agents.create(_cli_context(rt, tenant_id), spec)
    _show(AgentOut(**row, simulated=is_simulated(row["model"])))


@agents_app.command("list", cls=_Command)
def agents_list(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """List a tenant's agents."""
    rt = _runtime(data_dir)
    table = Table("name", "model", "tools")
    table.add_column("id", no_wrap=True, min_width=29)
    for a in rt.backend.tenant_store(_cli_context(rt, tenant_id)).list_agents():
        table.add_row(*_cells(a["name"], a["model"], ",".join(a["tools"]), a["id"]))
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


@app.command(cls=_Command)
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
    rt = _runtime(data_dir)
    ctx = _cli_context(rt, tenant_id)
    agents = {a["name"]: a["id"] for a in rt.backend.tenant_store(ctx).list_agents()}
    row = asyncio.run(rt.runs.start(ctx, agents.get(agent, agent), request))
    out = RunOut(**{**row, "simulated": bool(row["simulated"])}).model_dump(mode="json")
    _show({k: out[k] for k in _RUN_FIELDS})


# --- replay and demo ------------------------------------------------------------------


@app.command(cls=_Command)
def worker(
    concurrency: Annotated[
        int,
        typer.Option(
            min=1,
            max=1024,
            help="most runs executed at once (within it, as many as the fair share of this "
            "process's capacity allows, unless PATINOX_FAIR_SHARE=off)",
        ),
    ] = 256,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Execute queued (async) runs until interrupted; run as many as you like beside the servers.

    Set PATINOX_DATABASE_URL, PATINOX_OWNER_URL and PATINOX_KEK_URL (or --data-dir) to the
    same deployment as the API servers. Events are logged as JSON lines on stderr
    (PATINOX_LOG_LEVEL, default info).
    """
    from patinox._logs import configure_logging

    configure_logging()
    rt = _runtime(data_dir)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        w = rt.worker(concurrency=concurrency)
        watches = [asyncio.create_task(rt.runs.watch_tenants())]
        if rt.runs.admission is not None:
            watches.append(asyncio.create_task(rt.runs.admission.watch()))
        fair = " as this process's capacity allows" if rt.runs.admission is not None else ""
        _say(f"Patinox worker {w.holder} executing up to {concurrency} runs at once{fair}")
        try:
            await w.run(stop)
        finally:
            for watch in watches:
                watch.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
            await rt.runs.shutdown()
        _say(f"Worker stopped after {w.completed} runs.")

    from patinox._process import server_gc
    from patinox.limits import fair_loop

    fair = rt.settings.admission.enabled
    with server_gc(), asyncio.Runner(loop_factory=fair_loop.new_event_loop if fair else None) as runner:
        runner.run(go())  # as `patinox serve` (see patinox._process), on a tenant-fair loop


@app.command(cls=_Command)
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

    result = run_conformance(admin_url=database_url, models=model or None, examples=examples, out=_say)
    raise typer.Exit(0 if result.ok else 1)


def _plans(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        source, sep, plan = pair.partition("=")
        if not sep:
            _fail(f"--plan takes SOURCE=PLAN, got {pair!r}")
        out[source.strip()] = plan.strip()
    return out


def _run_replay(
    url: str,
    admin_key: str,
    *,
    trace: str,
    plans: dict[str, str],
    duration: float,
    compression: float,
    report_path: Path,
    model: str,
    traces_dir: Path | None,
    seed: int = 0,
    bounds: ReplayBounds | None = None,
) -> dict[str, Any]:
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from patinox.replay import ReplayProgress, load_trace, onboard, render_table, replay

    requests = load_trace(trace, sources=list(plans), duration_s=duration, seed=seed, data_dir=traces_dir)
    if not requests:
        _fail(f"no requests in the first {duration} s of {trace} for {sorted(plans)}")

    async def go() -> Any:
        prefix = f"replay-{int(time.time())}-"
        handles = await onboard(url, admin_key, plans, model=model, name_prefix=prefix)
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}", markup=False),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("replaying", total=len(requests), detail="")

            def on_progress(p: ReplayProgress) -> None:
                progress.update(
                    task,
                    completed=p.finished + p.dropped,
                    total=p.total,
                    detail=f"ok {p.completed} · 429 {p.throttled} · failed {p.failed} · dropped {p.dropped}",
                )

            return await replay(
                url,
                handles,
                requests,
                compression=compression,
                bounds=bounds,
                on_progress=on_progress,
                trace=trace,
            )

    try:
        report = asyncio.run(go())
    except httpx.ConnectError as err:
        _fail(f"cannot connect to {url} ({err}); is `patinox serve` running there?")
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        _fail(f"talking to {url} failed: {type(err).__name__}: {err}")
    console.print(render_table(report))
    data: dict[str, Any] = json.loads(report.to_json())
    try:
        report_path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as err:
        _fail(f"cannot write the report to {report_path}: {err.strerror or err}")
    _say(f"Report written to {report_path}")
    return data


_BOUNDS = ReplayBounds()


@app.command("replay", cls=_Command)
def replay_cmd(
    url: Annotated[str, typer.Option(help="server base URL")] = "http://127.0.0.1:8000",
    admin_key_file: Annotated[Path | None, typer.Option(help="file holding an operator key")] = None,
    admin_key: Annotated[str | None, typer.Option(envvar="PATINOX_ADMIN_KEY", help="an operator key")] = None,
    trace: Annotated[str, typer.Option(help="azure-llm-2023 | servegen-deepseek-r1")] = "azure-llm-2023",
    plan: Annotated[
        list[str] | None,
        typer.Option(help="SOURCE=PLAN, one tenant per source (azure-code, azure-conv, servegen-<client>)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for sampled arrivals (ServeGen)")] = 0,
    duration: Annotated[float, typer.Option(help="seconds of trace time to replay")] = 60.0,
    compression: Annotated[float, typer.Option(help="time compression factor (2 = twice as fast)")] = 1.0,
    model: Annotated[str, typer.Option(help="agent model (simulated by default)")] = "simulated",
    report: Annotated[Path, typer.Option(help="JSON report path")] = Path("replay-report.json"),
    traces_dir: Annotated[
        Path | None, typer.Option(help="traces folder (default: bundled data/traces)")
    ] = None,
    max_in_flight: Annotated[
        int, typer.Option(min=1, help="most requests in flight, all tenants together")
    ] = _BOUNDS.max_in_flight,
    max_in_flight_per_tenant: Annotated[
        int, typer.Option(min=1, help="most requests in flight per tenant (its connections)")
    ] = _BOUNDS.max_in_flight_per_tenant,
    late_tolerance: Annotated[
        float,
        typer.Option(min=0, help="seconds a request may leave after its due time; then dropped if no slot"),
    ] = _BOUNDS.late_tolerance_s,
    drain_timeout: Annotated[
        float,
        typer.Option(min=0, help="seconds to wait for answers after the last due time; then unfinished"),
    ] = _BOUNDS.drain_timeout_s,
) -> None:
    """Replay a real public trace against a running server, one tenant per trace source.

    Open loop and bounded: each request leaves at its trace time whatever became of the
    earlier ones, while fewer than --max-in-flight-per-tenant of its tenant and
    --max-in-flight in all are in flight; one that finds no free slot by --late-tolerance
    after its due time is dropped (never sent). The run ends --drain-timeout seconds after
    the last due time at the latest: requests still in flight then are cancelled and
    counted unfinished. Every request ends up completed, throttled (429), failed,
    unfinished or dropped; late counts those sent over --late-tolerance after their due time.
    """
    key = admin_key
    if not key and admin_key_file is not None:
        try:
            key = admin_key_file.read_text().strip()
        except (OSError, UnicodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            _fail(f"cannot read --admin-key-file {admin_key_file}: {reason}")
    if not key:
        _fail("give --admin-key-file or --admin-key (or PATINOX_ADMIN_KEY)")
    if not (compression > 0 and duration > 0 and math.isfinite(compression) and math.isfinite(duration)):
        _fail("--compression and --duration must be finite and > 0")
    _run_replay(
        url,
        key,
        trace=trace,
        plans=_plans(plan or ["azure-code=free", "azure-conv=pro"]),
        duration=duration,
        compression=compression,
        report_path=report,
        model=model,
        traces_dir=traces_dir,
        seed=seed,
        bounds=_replay_bounds(max_in_flight, max_in_flight_per_tenant, late_tolerance, drain_timeout),
    )


def _replay_bounds(total: int, per_tenant: int, late_tolerance: float, drain_timeout: float) -> ReplayBounds:
    try:
        return ReplayBounds(
            max_in_flight=total,
            max_in_flight_per_tenant=per_tenant,
            late_tolerance_s=late_tolerance,
            drain_timeout_s=drain_timeout,
        )
    except ConfigurationError as err:
        _fail(str(err))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _fail(f"the server exited with code {proc.returncode} during start-up")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    _fail(f"the server did not answer {url}/healthz within {timeout_s:.0f} s")


@app.command(cls=_Command)
def demo(
    duration: Annotated[float, typer.Option(help="seconds of trace time to replay")] = 240.0,
    compression: Annotated[float, typer.Option(help="time compression factor")] = 4.0,
    report: Annotated[Path, typer.Option(help="JSON report path")] = Path("demo-report.json"),
    data_dir: Annotated[
        Path | None, typer.Option(help="deployment directory (default: a fresh temporary one)")
    ] = None,
) -> None:
    """Replay real traces as two tenants against a fresh deployment, end to end.

    Inits an embedded deployment, serves it, onboards the two Azure trace services as
    tenants on different plans, replays the traces, prints the table and stops the server.
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="patinox-demo-") as tmp:
        ddir = data_dir or Path(tmp) / "deployment"
        key_file = Path(tmp) / "operator.key"
        init(data_dir=ddir, key_file=key_file)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        # The server's request log would bury the replay's progress: only its warnings and
        # errors show, unless PATINOX_LOG_LEVEL says otherwise.
        env = {**os.environ, "PATINOX_LOG_LEVEL": os.environ.get("PATINOX_LOG_LEVEL", "warning")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "patinox", "serve", "--data-dir", str(ddir), "--port", str(port)], env=env
        )
        try:
            _wait_healthy(url, proc)
            data = _run_replay(
                url,
                key_file.read_text().strip(),
                trace="azure-llm-2023",
                plans={"azure-code": "free", "azure-conv": "pro"},
                duration=duration,
                compression=compression,
                report_path=report,
                model="simulated",
                traces_dir=None,
            )
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    _say(
        f"Demo finished in {time.monotonic() - started:.1f} s; server stopped (exit code {proc.returncode})."
    )
    if not all(t["completed"] > 0 for t in data["tenants"]):
        _fail("a tenant completed no request")


def main() -> None:
    """Entry point: run the CLI; errors become ``error: <message>`` lines and exit code 1."""
    try:
        app()
    except PatinoxError as err:  # raised outside a command (the group prints the others)
        _print_errors([_error_message(err)])
        sys.exit(1)
