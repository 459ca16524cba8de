"""The ``patinox`` command line (Typer + Rich).

Operator commands act directly on the deployment's database (``--data-dir``, default
``$PATINOX_DATA_DIR`` or ``./.patinox``); ``replay`` and ``demo`` talk to a server over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from patinox.errors import PatinoxError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Patinox: a multi-tenant runtime for AI agents.",
)
tenants_app = typer.Typer(no_args_is_help=True, help="Create and manage tenants.")
keys_app = typer.Typer(no_args_is_help=True, help="Create and revoke API keys.")
agents_app = typer.Typer(no_args_is_help=True, help="Define a tenant's agents.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(agents_app, name="agents")

# Tables are wide; when output is not a terminal (CI logs, pipes) do not squeeze them to 80.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)
ACTOR = "cli"

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="PATINOX_DATA_DIR", help="deployment directory (SQLite file inside)"),
]
DEFAULT_DATA_DIR = Path(".patinox")


def _fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _runtime(data_dir: Path) -> Any:
    from patinox.api import Runtime, Settings

    if not (data_dir / "patinox.db").exists():
        _fail(f"no deployment in {data_dir}; run `patinox init --data-dir {data_dir}` first")
    return Runtime.build(Settings.for_data_dir(data_dir))


def _tenant_id(rt: Any, ref: str) -> str:
    """A tenant id from an id or a live tenant's name."""
    from patinox.tenancy import looks_like_id

    if looks_like_id(ref):
        return ref
    for t in rt.tenants.list():
        if t.name == ref:
            return str(t.id)
    _fail(f"no live tenant named {ref!r}; `patinox tenants list` shows them")


def _limits(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            _fail(f"--limit takes NAME=VALUE, got {pair!r}")
        try:
            out[name] = float(value) if "." in value else int(value)
        except ValueError:
            _fail(f"--limit {name} needs a number, got {value!r}")
    return out


def _show(obj: Any) -> None:
    data = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    console.print_json(json.dumps(data, default=str))


@app.callback()
def _main() -> None:
    """Patinox: a multi-tenant runtime for AI agents."""


@app.command()
def init(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    key_file: Annotated[
        Path | None,
        typer.Option(help="write the operator key here (mode 0600) instead of printing it"),
    ] = None,
) -> None:
    """Create a deployment: its database (migrated) and the first operator key."""
    from patinox.api import Runtime, Settings

    rt = Runtime.initialise(data_dir)
    if rt.backend.list_api_keys(None):
        _fail(
            f"{data_dir} is already initialised; create more operator keys with "
            "`patinox keys create --operator`"
        )
    issued = rt.keys.create(tenant_id=None, name="operator", scopes=None, actor=ACTOR)
    if key_file is not None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(issued.secret + "\n")
        console.print(f"Initialised {data_dir}; operator key written to {key_file} (mode 0600).")
    else:
        console.print(f"Initialised {data_dir}. Operator key (shown once, store it now):")
        console.print(issued.secret, highlight=False, soft_wrap=True)


@app.command()
def serve(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
) -> None:
    """Run the HTTP API server until interrupted."""
    import uvicorn

    from patinox.api import create_app

    app_ = create_app(runtime=_runtime(data_dir))
    console.print(f"Patinox serving {data_dir} on http://{host}:{port} (docs at /docs)")
    uvicorn.run(app_, host=host, port=port, log_level=log_level, access_log=False)


# --- tenants ---------------------------------------------------------------------------


@tenants_app.command("create")
def tenants_create(
    name: str,
    plan: Annotated[str, typer.Option(help="free | pro | enterprise")] = "free",
    isolation_level: Annotated[
        str, typer.Option(help="namespace (others need their executors)")
    ] = "namespace",
    limit: Annotated[
        list[str] | None, typer.Option(help="override a plan limit: NAME=VALUE (repeatable)")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create a tenant."""
    from patinox.control import TenantSpec

    rt = _runtime(data_dir)
    try:
        spec = TenantSpec.model_validate(
            {
                "name": name,
                "plan": plan,
                "isolation_level": isolation_level,
                "limits": _limits(limit or []),
            }
        )
    except ValueError as err:
        _fail(str(err))
    _show(rt.tenants.create(spec, actor=ACTOR))


@tenants_app.command("list")
def tenants_list(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    all_: Annotated[bool, typer.Option("--all", help="include deleted tenants (tombstones)")] = False,
) -> None:
    """List tenants."""
    rt = _runtime(data_dir)
    table = Table("name", "plan", "state", "isolation", "created")
    table.add_column("id", no_wrap=True, min_width=29)
    for t in rt.tenants.list(include_deleted=all_):
        table.add_row(
            t.name,
            t.plan,
            t.state.value,
            t.isolation_level.value,
            t.created_at.isoformat(timespec="seconds"),
            t.id,
        )
    console.print(table)


@tenants_app.command("show")
def tenants_show(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Show one tenant with its effective limits."""
    rt = _runtime(data_dir)
    _show(rt.tenants.get(_tenant_id(rt, tenant_id)))


@tenants_app.command("update")
def tenants_update(
    tenant_id: str,
    plan: Annotated[str | None, typer.Option(help="new plan")] = None,
    limit: Annotated[list[str] | None, typer.Option(help="NAME=VALUE; replaces all overrides")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a tenant's plan or limit overrides."""
    from patinox.control import TenantUpdate

    try:
        change = TenantUpdate.model_validate(
            {"plan": plan, "limits": _limits(limit) if limit is not None else None}
        )
    except ValueError as err:
        _fail(str(err))
    rt = _runtime(data_dir)
    _show(rt.tenants.update(_tenant_id(rt, tenant_id), change, actor=ACTOR))


@tenants_app.command("suspend")
def tenants_suspend(tenant_id: str, reason: str = "", data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Suspend a tenant: data kept, every call refused."""
    rt = _runtime(data_dir)
    _show(rt.tenants.suspend(_tenant_id(rt, tenant_id), actor=ACTOR, reason=reason))


@tenants_app.command("resume")
def tenants_resume(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Resume a suspended tenant."""
    rt = _runtime(data_dir)
    _show(rt.tenants.resume(_tenant_id(rt, tenant_id), actor=ACTOR))


@tenants_app.command("delete")
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
    console.print(f"Deleted {tenant_id}; rows purged: {counts}")


# --- keys ------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    tenant_id: Annotated[str | None, typer.Argument(help="tenant id (omit with --operator)")] = None,
    name: Annotated[str, typer.Option(help="a label for the key")] = "default",
    scope: Annotated[
        list[str] | None, typer.Option(help="agents:write | runs:write | read (repeatable)")
    ] = None,
    operator: Annotated[bool, typer.Option("--operator", help="an operator (admin) key")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create an API key; the secret is printed once."""
    if operator == (tenant_id is not None):
        _fail("give a TENANT_ID, or --operator for an operator key")
    rt = _runtime(data_dir)
    tid = _tenant_id(rt, tenant_id) if tenant_id is not None else None
    issued = rt.keys.create(tenant_id=tid, name=name, scopes=scope, actor=ACTOR)
    _show(issued.record)
    console.print("Key (shown once, store it now):")
    console.print(issued.secret, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(
    tenant_id: Annotated[str | None, typer.Argument()] = None, data_dir: DataDir = DEFAULT_DATA_DIR
) -> None:
    """List a tenant's keys (operator keys when no tenant is given)."""
    rt = _runtime(data_dir)
    table = Table("prefix", "name", "scopes", "revoked")
    table.add_column("id", no_wrap=True, min_width=30)
    for k in rt.backend.list_api_keys(_tenant_id(rt, tenant_id) if tenant_id else None):
        table.add_row(
            k["prefix"], k["name"], ",".join(k["scopes"]), "yes" if k["revoked_at"] else "", k["id"]
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: str,
    tenant: Annotated[str | None, typer.Option(help="the key's tenant id (omit for operator keys)")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Revoke a key; it is refused from the next request on."""
    rt = _runtime(data_dir)
    _show(rt.keys.revoke(key_id, tenant_id=_tenant_id(rt, tenant) if tenant else None, actor=ACTOR))


# --- agents and runs ------------------------------------------------------------------


def _cli_context(rt: Any, tenant_id: str) -> Any:
    from patinox.errors import TenantSuspended
    from patinox.tenancy import TenantContext

    t = rt.tenants.get(_tenant_id(rt, tenant_id))
    if t.state.value == "suspended":
        raise TenantSuspended("this tenant is suspended", tenant_id=tenant_id)
    return TenantContext(
        tenant_id=t.id,
        principal=ACTOR,
        scopes=frozenset({"agents:write", "runs:write", "read"}),
        plan=t.plan,
        limits=t.limits,
        isolation_level=t.isolation_level,
        storage_model=t.storage_model,
    )


@agents_app.command("create")
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
    from patinox.control import AgentSpec

    rt = _runtime(data_dir)
    try:
        spec = AgentSpec(name=name, model=model, instructions=instructions, tools=tool or [])
    except ValueError as err:
        _fail(str(err))
    _show(rt.agents.create(_cli_context(rt, tenant_id), spec))


@agents_app.command("list")
def agents_list(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """List a tenant's agents."""
    rt = _runtime(data_dir)
    table = Table("name", "model", "tools")
    table.add_column("id", no_wrap=True, min_width=29)
    for a in rt.backend.tenant_store(_cli_context(rt, tenant_id)).list_agents():
        table.add_row(a["name"], a["model"], ",".join(a["tools"]), a["id"])
    console.print(table)


@app.command()
def run(
    tenant_id: str,
    agent: Annotated[str, typer.Argument(help="agent id or name")],
    prompt: str,
    output_tokens: Annotated[int | None, typer.Option(help="output tokens to ask for")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Run a tenant's agent once, in this process, through the same admission path as the API."""
    from patinox.control import RunRequest

    rt = _runtime(data_dir)
    ctx = _cli_context(rt, tenant_id)
    agents = {a["name"]: a["id"] for a in rt.backend.tenant_store(ctx).list_agents()}
    agent_id = agents.get(agent, agent)
    row = asyncio.run(rt.runs.start(ctx, agent_id, RunRequest(input=prompt, output_tokens=output_tokens)))
    _show(
        {
            k: row[k]
            for k in (
                "id",
                "status",
                "model",
                "output",
                "input_tokens",
                "output_tokens",
                "tool_calls",
                "duration_ms",
            )
        }
    )


# --- replay and demo ------------------------------------------------------------------


def _plans(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        source, sep, plan = pair.partition("=")
        if not sep:
            _fail(f"--plan takes SOURCE=PLAN, got {pair!r}")
        out[source] = plan
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
) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from patinox.errors import ConfigurationError
    from patinox.replay import ReplayProgress, load_trace, onboard, render_table, replay

    try:
        requests = load_trace(trace, sources=list(plans), duration_s=duration, seed=seed, data_dir=traces_dir)
    except ConfigurationError as err:
        _fail(err.message)
    if not requests:
        _fail(f"no requests in the first {duration} s of {trace} for {sorted(plans)}")

    async def go() -> Any:
        prefix = f"replay-{int(time.time())}-"
        handles = await onboard(url, admin_key, plans, model=model, name_prefix=prefix)
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("replaying", total=len(requests), detail="")

            def on_progress(p: ReplayProgress) -> None:
                progress.update(
                    task,
                    completed=p.finished,
                    total=p.total,
                    detail=f"ok {p.completed} · 429 {p.throttled} · failed {p.failed}",
                )

            return await replay(
                url,
                handles,
                requests,
                compression=compression,
                on_progress=on_progress,
                trace=trace,
            )

    report = asyncio.run(go())
    console.print(render_table(report))
    data: dict[str, Any] = json.loads(report.to_json())
    report_path.write_text(json.dumps(data, indent=2) + "\n")
    console.print(f"Report written to {report_path}")
    return data


@app.command("replay")
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
) -> None:
    """Replay a real public trace against a running server, one tenant per trace source."""
    key = admin_key or (admin_key_file.read_text().strip() if admin_key_file else None)
    if not key:
        _fail("give --admin-key-file or --admin-key (or PATINOX_ADMIN_KEY)")
    if compression <= 0 or duration <= 0:
        _fail("--compression and --duration must be > 0")
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
    )


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


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="seconds of trace time to replay")] = 240.0,
    compression: Annotated[float, typer.Option(help="time compression factor")] = 4.0,
    report: Annotated[Path, typer.Option(help="JSON report path")] = Path("demo-report.json"),
    data_dir: Annotated[
        Path | None, typer.Option(help="deployment directory (default: a fresh temporary one)")
    ] = None,
) -> None:
    """The main job end to end: init an embedded deployment, serve it, onboard the two Azure
    tenants on different plans, replay the traces, print the table, stop the server."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="patinox-demo-") as tmp:
        ddir = data_dir or Path(tmp) / "deployment"
        key_file = Path(tmp) / "operator.key"
        init(data_dir=ddir, key_file=key_file)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "patinox", "serve", "--data-dir", str(ddir), "--port", str(port)]
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
    console.print(
        f"Demo finished in {time.monotonic() - started:.1f} s; server stopped (exit code {proc.returncode})."
    )
    if not all(t["completed"] > 0 for t in data["tenants"]):
        _fail("a tenant completed no request")


def main() -> None:
    """Entry point: run the CLI, turning Patinox errors into a one-line message and exit code 1."""
    try:
        app()
    except PatinoxError as err:
        err_console.print(f"[red]error:[/red] {err.message} ({err.code})")
        sys.exit(1)
