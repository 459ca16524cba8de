"""``patinox init`` (create a deployment), ``patinox serve`` (the HTTP API server) and
``patinox demo`` (init, serve and replay real traces, end to end)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from patinox.cli._deployment import ACTOR, DEFAULT_DATA_DIR, DataDir, open_runtime, where
from patinox.cli._output import fail, say
from patinox.cli.replay import run_replay
from patinox.runtime import Runtime

if TYPE_CHECKING:
    import uvicorn


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
    created = not data_dir.exists()
    rt = Runtime.initialise(data_dir)
    if created:
        data_dir.chmod(0o700)
    db = data_dir / "patinox.db"
    if db.exists():
        db.chmod(0o600)
    if rt.backend.list_api_keys(None):
        fail(
            f"{where(rt, data_dir)} is already initialised; create more operator keys with "
            "`patinox keys create --operator`"
        )
    issued = rt.keys.create(tenant_id=None, name="operator", scopes=None, actor=ACTOR)
    if key_file is not None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        with os.fdopen(fd, "w") as fh:
            fh.write(issued.secret + "\n")
        say(f"Initialised {where(rt, data_dir)}; operator key written to {key_file} (mode 0600).")
    else:
        say(f"Initialised {where(rt, data_dir)}. Operator key (shown once, store it now):")
        say(issued.secret)


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear message unless ``host:port`` can be bound (as uvicorn will)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        fail(f"cannot bind {host}: {err.strerror}; give an address with --host")
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                fail(f"port {port} is in use; choose another with --port")
            fail(f"cannot bind {host}:{port}: {err.strerror or err}")


def serve(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn's own log level (start-up, errors)")] = "warning",
    tls: Annotated[
        bool, typer.Option("--tls", help="serve HTTPS: each tenant host name with its own certificate (SNI)")
    ] = False,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="PATINOX_TLS_CERT", help="the deployment certificate chain (PEM), for other names"
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(envvar="PATINOX_TLS_KEY", help="the deployment certificate's private key (PEM)"),
    ] = None,
) -> None:
    """Run the HTTP API server until interrupted.

    Every request is logged as one JSON line on stderr (PATINOX_LOG_LEVEL: debug, info,
    warning, error; default info). With ``--tls`` every tenant host name is served with the
    tenant's own certificate (``PUT /v1/tls``), chosen by SNI, and any other name with the
    deployment certificate (``--tls-cert``/``--tls-key``); a replaced tenant certificate is
    served from the next handshake on.
    """
    if tls and (tls_cert is None or tls_key is None):
        fail("--tls needs the deployment certificate: --tls-cert and --tls-key (or PATINOX_TLS_CERT/KEY)")
    if not tls and (tls_cert is not None or tls_key is not None):
        fail("--tls-cert/--tls-key are used with --tls only")
    import uvicorn

    from patinox._logs import configure_logging
    from patinox._process import server_gc
    from patinox.api import create_app

    configure_logging()

    rt = open_runtime(data_dir)
    app_ = create_app(runtime=rt)
    _check_port_free(host, port)
    scheme = "https" if tls else "http"
    say(f"Patinox serving {where(rt, data_dir)} on {scheme}://{host}:{port} (docs at /docs)")
    # The start-up heap frozen and the collector's thresholds set for a server (see
    # patinox._process); as they were again when the server stops.
    with server_gc():
        # reset_contextvars: each request starts from a clean context (see clear_inherited_tenant).
        # While the fair share is on, the loop takes ready callbacks by tenant in turn
        # (patinox.limits.fair_loop); off, it is asyncio's own.
        fair = rt.settings.admission.enabled
        loop = "patinox.limits.fair_loop:new_event_loop" if fair else "asyncio"
        if not tls:
            uvicorn.run(
                app_,
                host=host,
                port=port,
                log_level=log_level,
                access_log=False,
                reset_contextvars=True,
                loop=loop,
            )
            return
        config = uvicorn.Config(
            app_,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            reset_contextvars=True,
            loop=loop,
        )
        if tls:
            assert tls_cert is not None and tls_key is not None
            try:
                config = https_config(config, rt, cert_file=tls_cert, key_file=tls_key)
            except (OSError, ssl.SSLError) as err:
                fail(f"cannot load the deployment certificate {tls_cert} / {tls_key}: {err}")
        uvicorn.Server(config).run()


def https_config(config: uvicorn.Config, rt: Runtime, *, cert_file: Path, key_file: Path) -> uvicorn.Config:
    """``config`` made to serve HTTPS with per-tenant certificates: uvicorn's own SSL
    context (from the deployment certificate ``cert_file``/``key_file``, PEM) is built by
    :meth:`uvicorn.Config.load`, then given the SNI callback
    (:class:`patinox.control.tls.SniCertificates`) that switches each handshake on a tenant
    host name to that tenant's certificate. Returns ``config``, loaded.

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: the deployment certificate or key is refused.
    """
    from patinox.control.tls import SniCertificates

    config.ssl_certfile = str(cert_file)
    config.ssl_keyfile = str(key_file)
    config.load()
    assert config.ssl is not None
    config.ssl.sni_callback = SniCertificates(rt.backend, rt.endpoints)
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"the server exited with code {proc.returncode} during start-up")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    fail(f"the server did not answer {url}/healthz within {timeout_s:.0f} s")


_DEMO_BASE_DOMAIN = "patinox.localhost"


def _show_endpoints(url: str, operator_key: str, port: int) -> None:
    """Print each tenant's own host names and effective configuration highlights (the
    operator's view, asked of the running server)."""
    import httpx

    headers = {"Authorization": f"Bearer {operator_key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10.0) as client:
        for tenant in client.get("/admin/tenants").json():
            endpoint = client.get(f"/admin/tenants/{tenant['id']}/endpoint").json()
            config = client.get(f"/admin/tenants/{tenant['id']}/config").json()
            hosts = ", ".join(f"http://{h}:{port}" for h in endpoint.get("hosts", [])) or "none"
            limits = config.get("limits", {})
            tools = limits.get("allowed_tools", {}).get("value")
            say(
                f"tenant {tenant['name']}: endpoint {hosts} (its keys only; every key on {url}); "
                f"plan {config.get('plan')}, {limits.get('requests_per_minute', {}).get('value')} "
                f"requests/min, tools {'all installed' if tools is None else ', '.join(tools)}"
            )


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
        # Tenant endpoints on: each tenant at <slug>.patinox.localhost (RFC 6761 names
        # resolve to loopback), the replay on the base host 127.0.0.1.
        env.setdefault("PATINOX_BASE_DOMAIN", _DEMO_BASE_DOMAIN)
        env.setdefault("PATINOX_BASE_HOSTS", "127.0.0.1,localhost")
        proc = subprocess.Popen(
            [sys.executable, "-m", "patinox", "serve", "--data-dir", str(ddir), "--port", str(port)], env=env
        )
        try:
            _wait_healthy(url, proc)
            data = run_replay(
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
            _show_endpoints(url, key_file.read_text().strip(), port)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    say(f"Demo finished in {time.monotonic() - started:.1f} s; server stopped (exit code {proc.returncode}).")
    if not all(t["completed"] > 0 for t in data["tenants"]):
        fail("a tenant completed no request")
