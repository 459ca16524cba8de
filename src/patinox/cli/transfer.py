"""``patinox tenants export | import | move | rotate-key``: a tenant's data moved between
deployments (an encrypted bundle) or storage models, and re-encrypted under a new DEK.

The commands are registered on the ``tenants`` group by :mod:`patinox.cli.tenants`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from patinox.cli._deployment import ACTOR, DEFAULT_DATA_DIR, DataDir, open_runtime, resolve_tenant
from patinox.cli._output import fail, progress_bar, say
from patinox.tenancy import StorageModel


def _secret(passphrase_env: str | None, passphrase_file: Path | None, *, confirm: bool) -> str | None:
    """The bundle passphrase from an environment variable, a file, or a hidden prompt."""
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            fail(f"environment variable {passphrase_env} is empty or unset")
        return value
    if passphrase_file is not None:
        return passphrase_file.read_text().rstrip("\n")
    return str(typer.prompt("Bundle passphrase", hide_input=True, confirmation_prompt=confirm))


PassEnv = Annotated[
    str | None, typer.Option(help="read the bundle passphrase from this environment variable")
]
PassFile = Annotated[Path | None, typer.Option(help="read the bundle passphrase from this file")]


def _storage_model(value: str) -> StorageModel:
    """The StorageModel named ``value``, or a one-line error listing the valid names."""
    try:
        return StorageModel(value.lower())
    except ValueError:
        fail(f"unknown storage model {value!r}; use one of: {', '.join(m.value for m in StorageModel)}")


def tenants_export(
    tenant_id: str,
    path: Path,
    recipient: Annotated[
        Path | None, typer.Option(help="seal for this X25519 public key (PEM) instead of a passphrase")
    ] = None,
    passphrase_env: PassEnv = None,
    passphrase_file: PassFile = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing file")] = False,
    include_secrets: Annotated[
        bool,
        typer.Option(
            "--include-secrets", help="also carry the tenant's secrets (audited; left out by default)"
        ),
    ] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Write an encrypted bundle of everything a tenant owns (mode 0600); its secrets only
    with ``--include-secrets``, which the tenant's audit log records.

    The bundle is sealed with its own passphrase or recipient key, not with the deployment's
    keys: it stays readable after the tenant is deleted, so guard it like a backup.
    """
    from patinox.control.transfer import export_tenant

    if path.exists() and not overwrite:
        fail(f"{path} exists; choose another path or pass --overwrite")
    rt = open_runtime(data_dir)
    tid = resolve_tenant(rt, tenant_id)
    public = recipient.read_bytes() if recipient is not None else None
    secret = None if public is not None else _secret(passphrase_env, passphrase_file, confirm=True)
    with progress_bar("exporting") as update:
        summary = export_tenant(
            rt.backend,
            tid,
            path,
            passphrase=secret,
            recipient_public_key=public,
            progress=update,
            overwrite=overwrite,
            include_secrets=include_secrets,
        )
    say(
        f"Exported tenant {summary.tenant_name} ({tid}) to {path}: {summary.records} records, "
        f"{summary.size_bytes} bytes, sealed with a {summary.protection}."
    )


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

    rt = open_runtime(data_dir)
    private = identity.read_bytes() if identity is not None else None
    secret = None if private is not None else _secret(passphrase_env, passphrase_file, confirm=False)
    model = _storage_model(storage_model) if storage_model else None
    # Progress is in bundle bytes, counted twice: once to verify the whole bundle, once to write it.
    with progress_bar("verifying, then importing") as update:
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
    say(
        f"Imported as tenant {tenant.name} ({tenant.id}); "
        f"issue it keys with `patinox keys create {tenant.id}`."
    )


def tenants_move(
    tenant_id: str,
    to: Annotated[str, typer.Option(help="pool | bridge | silo")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Move a tenant to another storage model online: reads go on, writes are held briefly,
    the old copy is removed after the switch."""
    from patinox.control.transfer import move_tenant

    rt = open_runtime(data_dir)
    tid = resolve_tenant(rt, tenant_id)
    with progress_bar("moving") as update:
        summary = move_tenant(rt.backend, tid, _storage_model(to), actor=ACTOR, progress=update)
    copied = sum(summary.rows.values())
    if summary.from_model is summary.to_model:
        say(
            f"Tenant {tid} is already on {summary.to_model.value}: nothing moved "
            "(any copy an interrupted move left elsewhere was removed)."
        )
        return
    say(
        f"Moved {tid} from {summary.from_model.value} to {summary.to_model.value}: {copied} rows copied "
        f"and verified, old copy removed, {summary.duration_s:.1f} s."
    )


def tenants_rotate_key(tenant_id: str, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Give a tenant a new data key (DEK) and re-encrypt its payloads under it."""
    rt = open_runtime(data_dir)
    tid = resolve_tenant(rt, tenant_id)
    key = rt.backend.keyring.rotate_dek(tid)
    with progress_bar("re-encrypting") as update:
        n = rt.backend.acting_on(tid).reencrypt(progress=update)
    rt.backend.acting_on(tid).append_audit(
        actor=ACTOR,
        action="tenant.rotate_dek",
        target=tid,
        outcome="ok",
        detail={"version": key.version, "rows": n},
    )
    say(f"Tenant {tid} now uses DEK version {key.version}; {n} payloads re-encrypted.")
