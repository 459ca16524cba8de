"""``patinox tenants tls``: set, show and remove a tenant's TLS certificate (served by
``patinox serve --tls`` on the tenant's host names; see :mod:`patinox.control.tls`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic_core import to_jsonable_python

from patinox.cli._deployment import ACTOR, DEFAULT_DATA_DIR, DataDir, open_runtime, resolve_tenant
from patinox.cli._output import Command, Group, say, show
from patinox.control.tls import TenantTls, TlsCertificateInfo

app = typer.Typer(cls=Group, no_args_is_help=True, help="A tenant's TLS certificate (served by SNI).")


def _show(info: TlsCertificateInfo) -> None:
    show({f: to_jsonable_python(getattr(info, f)) for f in TlsCertificateInfo.__slots__})
    if info.warning:
        say(f"warning: {info.warning}")


@app.command("set", cls=Command)
def tls_set(
    tenant_id: str,
    cert: Annotated[Path, typer.Option(help="PEM certificate chain, the tenant's certificate first")],
    key: Annotated[Path, typer.Option(help="its private key, unencrypted PEM")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Validate and store (or replace) a tenant's certificate and key: the key must match,
    every host name of the tenant must be covered and the certificate unexpired."""
    rt = open_runtime(data_dir)
    tid = resolve_tenant(rt, tenant_id)
    _show(TenantTls(rt.backend, rt.endpoints).put(tid, cert.read_text(), key.read_text(), actor=ACTOR))


@app.command("show", cls=Command)
def tls_show(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Show a tenant's certificate: subject, names, expiry (never the key)."""
    rt = open_runtime(data_dir)
    _show(TenantTls(rt.backend, rt.endpoints).get(resolve_tenant(rt, tenant_id), actor=ACTOR))


@app.command("remove", cls=Command)
def tls_remove(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Remove a tenant's certificate; its host names get the deployment certificate."""
    rt = open_runtime(data_dir)
    TenantTls(rt.backend, rt.endpoints).delete(resolve_tenant(rt, tenant_id), actor=ACTOR)
    say("removed")
