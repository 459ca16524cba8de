"""``patinox keys``: create, list, rotate and revoke API keys; rotate the deployment's KEK."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from patinox.cli._deployment import ACTOR, DEFAULT_DATA_DIR, DataDir, open_runtime, resolve_tenant
from patinox.cli._output import Command, Group, cells, console, fail, progress_bar, say, show, utc
from patinox.control import TENANT_SCOPES
from patinox.errors import NotFound

if TYPE_CHECKING:
    from patinox.api.schemas import KeyOut
    from patinox.runtime import Runtime
    from patinox.storage import ApiKeyRecord

app = typer.Typer(cls=Group, no_args_is_help=True, help="Create and revoke API keys.")


def _key_out(row: ApiKeyRecord) -> KeyOut:
    from patinox.api.schemas import KeyOut

    return KeyOut(**row)


@app.command("create", cls=Command)
def keys_create(
    tenant_id: Annotated[str | None, typer.Argument(help="tenant id or name (omit with --operator)")] = None,
    name: Annotated[str, typer.Option(help="a label for the key")] = "default",
    scope: Annotated[
        list[str] | None,
        typer.Option(help=" | ".join(sorted(TENANT_SCOPES)) + " (repeatable; replaces the default set)"),
    ] = None,
    operator: Annotated[bool, typer.Option("--operator", help="an operator (admin) key")] = False,
    expires_in_s: Annotated[
        float | None, typer.Option("--expires-in-s", min=1, help="it stops working after this many seconds")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create an API key; the secret is printed once."""
    if operator and tenant_id is not None:
        fail("--operator creates an operator key and takes no TENANT_ID")
    if not operator and tenant_id is None:
        fail("give a TENANT_ID, or --operator for an operator key")
    rt = open_runtime(data_dir)
    tid = resolve_tenant(rt, tenant_id) if tenant_id is not None else None
    expires_at = None if expires_in_s is None else datetime.now(UTC) + timedelta(seconds=expires_in_s)
    issued = rt.keys.create(tenant_id=tid, name=name, scopes=scope, actor=ACTOR, expires_at=expires_at)
    show(_key_out(issued.record))
    say("Key (shown once, store it now):")
    say(issued.secret)


@app.command("list", cls=Command)
def keys_list(
    tenant_id: Annotated[
        str | None, typer.Argument(help="tenant id or name (omit for operator keys)")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List a tenant's keys (operator keys when no tenant is given)."""
    rt = open_runtime(data_dir)
    table = Table("prefix", "name", "scopes", "revoked", "expires", "last used")
    table.add_column("id", no_wrap=True, min_width=30)
    for k in rt.keys.keys_of(resolve_tenant(rt, tenant_id) if tenant_id else None):
        expires, used = k.get("expires_at"), k.get("last_used_at")
        table.add_row(
            *cells(
                k["prefix"],
                k["name"],
                ",".join(k["scopes"]),
                "yes" if k["revoked_at"] else "",
                utc(expires) if expires else "",
                utc(used) if used else "",
                k["id"],
            )
        )
    console.print(table)


@app.command("rotate-kek", cls=Command)
def keys_rotate_kek(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Add a new key-encryption key (KEK) version and re-wrap every tenant's DEKs under it.

    Payloads are not touched: only the wrapped form of each DEK changes. Old KEK versions
    stay in the key file so a re-wrap interrupted half way can simply be run again.
    """
    from patinox.storage.crypto import FileKeyProvider

    rt = open_runtime(data_dir)
    provider = rt.backend.keyring.provider
    if not isinstance(provider, FileKeyProvider):
        fail("KEK rotation here needs a file key provider; rotate a KMS key in the KMS")
    version = provider.rotate()
    tenants = [t.id for t in rt.tenants.list()]
    with progress_bar("re-wrapping") as update:
        n = 0
        for i, tid in enumerate(tenants, 1):
            n += rt.backend.keyring.rewrap_all([tid])
            update(i, len(tenants))
    rt.backend.append_operator_audit(
        actor=ACTOR, action="kek.rotate", target=None, outcome="ok", detail={"version": version, "deks": n}
    )
    say(f"KEK version {version} is current; {n} DEKs re-wrapped.")


def _key_tenant(rt: Runtime, key_id: str) -> str | None:
    """The tenant id of key ``key_id`` (``None`` for an operator key); key ids are unique
    across the deployment.

    Raises:
        NotFound: no live tenant and no operator has that key.
    """
    if any(k["id"] == key_id for k in rt.keys.keys_of(None)):
        return None
    for t in rt.tenants.list():
        if any(k["id"] == key_id for k in rt.keys.keys_of(t.id)):
            return str(t.id)
    raise NotFound(f"api key {key_id!r} not found", key_id=key_id)


@app.command("revoke", cls=Command)
def keys_revoke(
    key_id: str,
    tenant: Annotated[
        str | None, typer.Option(help="the key's tenant id or name (default: found from the key id)")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Revoke a key; it is refused from the next request on."""
    rt = open_runtime(data_dir)
    tenant_id = resolve_tenant(rt, tenant) if tenant else _key_tenant(rt, key_id)
    show(_key_out(rt.keys.revoke(key_id, tenant_id=tenant_id, actor=ACTOR)))


@app.command("rotate", cls=Command)
def keys_rotate(
    key_id: str,
    overlap_s: Annotated[
        float, typer.Option("--overlap-s", min=0, max=30 * 86_400, help="seconds the old key keeps working")
    ] = 3600.0,
    tenant: Annotated[
        str | None, typer.Option(help="the key's tenant id or name (default: found from the key id)")
    ] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Replace a key with a new one of the same name and scopes; the old one works on for
    --overlap-s seconds. The new secret is printed once."""
    rt = open_runtime(data_dir)
    tenant_id = resolve_tenant(rt, tenant) if tenant else _key_tenant(rt, key_id)
    issued = rt.keys.rotate(key_id, tenant_id=tenant_id, actor=ACTOR, overlap_s=overlap_s)
    show(_key_out(issued.record))
    say("New key (shown once, store it now):")
    say(issued.secret)
