"""Secrets in export bundles and moves: left out of a bundle unless the export asks for
them (then audited, and carried sealed in the bundle), always carried by a move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from patinox.control.transfer import _bundle, export_tenant, import_tenant, move_tenant
from patinox.runtime import Runtime
from patinox.storage import SqlBackend
from patinox.tenancy import StorageModel
from tests.conftest import Deployment

PASS = "correct horse battery staple"
CANARY = "sk-canary-transfer-91c2e7"


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bundle, "SCRYPT_N", 2**14)


def _bundle_records(path: Path) -> list[dict[str, Any]]:
    return list(_bundle._BundleReader(path, passphrase=PASS, recipient_private_key=None).records())


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_secrets_leave_a_bundle_out_unless_asked_for_and_audited(
    make_tenant: Any, runtime: Runtime, backend: SqlBackend, tmp_path: Path
) -> None:
    t = make_tenant("acme")
    t.agent("a")
    backend.acting_on(t.id).secrets().put("provider:openai", CANARY, actor="test")

    plain = export_tenant(backend, t.id, tmp_path / "plain.ptx", passphrase=PASS)
    assert "secret" not in plain.counts
    assert not [r for r in _bundle_records(tmp_path / "plain.ptx") if r["type"] == "secret"]
    assert CANARY.encode() not in (tmp_path / "plain.ptx").read_bytes()
    assert not [r for r in backend.acting_on(t.id).list_audit() if r["action"] == "secrets.export"]

    full = export_tenant(
        backend, t.id, tmp_path / "full.ptx", passphrase=PASS, include_secrets=True, actor="ops"
    )
    assert full.counts["secret"] == 1
    assert CANARY.encode() not in (tmp_path / "full.ptx").read_bytes()  # sealed in the bundle
    (audited,) = [r for r in backend.acting_on(t.id).list_audit() if r["action"] == "secrets.export"]
    assert audited["actor"] == "ops" and audited["detail"] == {"secrets": ["provider:openai"]}
    assert CANARY not in repr(audited)

    without = import_tenant(backend, tmp_path / "plain.ptx", passphrase=PASS, name="acme-plain", actor="test")
    assert backend.acting_on(without.id).secrets().list() == []
    copy = import_tenant(backend, tmp_path / "full.ptx", passphrase=PASS, name="acme-full", actor="test")
    secrets = backend.acting_on(copy.id).secrets()
    assert secrets.value("provider:openai", actor="test", purpose="check") == CANARY


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_a_move_between_storage_models_carries_secrets(
    make_tenant: Any, backend: SqlBackend, deployment: Deployment
) -> None:
    t = make_tenant("acme")
    backend.acting_on(t.id).secrets().put("token", CANARY, actor="test")
    target = StorageModel.BRIDGE if deployment.postgres else StorageModel.SILO
    move_tenant(backend, t.id, target, actor="test")
    assert backend.acting_on(t.id).secrets().value("token", actor="test", purpose="check") == CANARY
