"""Operator commands for data movement and keys: export, import, move, key rotation, worker."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from patinox.control import RunRequest
from patinox.runtime import Runtime, Settings
from tests.cli.conftest import cli, first_json


def _seed(data_dir: Path) -> str:
    assert cli("tenants", "create", "acme").exit_code == 0
    assert cli("agents", "create", "acme", "helper", "--model", "simulated:instant").exit_code == 0
    r = cli("run", "acme", "helper", "a-secret-prompt-marker", "--output-tokens", "3")
    assert r.exit_code == 0, r.output
    return str(first_json(cli("tenants", "show", "acme").output)["id"])


def test_export_then_import_under_a_new_name(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(data_dir)
    monkeypatch.setenv("BUNDLE_PASS", "correct horse battery staple")
    bundle = tmp_path / "acme.bundle"
    r = cli("tenants", "export", "acme", str(bundle), "--passphrase-env", "BUNDLE_PASS")
    assert r.exit_code == 0, r.output
    assert oct(bundle.stat().st_mode & 0o777) == "0o600"
    assert b"a-secret-prompt-marker" not in bundle.read_bytes()
    monkeypatch.setenv("WRONG_PASS", "wrong")
    r = cli("tenants", "import", str(bundle), "--name", "acme-copy", "--passphrase-env", "WRONG_PASS")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "acme-copy" not in cli("tenants", "list").output
    r = cli(
        "tenants",
        "import",
        str(bundle),
        "--name",
        "acme-copy",
        "--storage-model",
        "silo",
        "--passphrase-env",
        "BUNDLE_PASS",
    )
    assert r.exit_code == 0, r.output
    copy = first_json(cli("tenants", "show", "acme-copy").output)
    assert copy["storage_model"] == "silo"
    rt = Runtime.build(Settings.for_data_dir(data_dir))
    runs = rt.backend.acting_on(copy["id"]).list_runs()
    assert [x["input"] for x in runs] == ["a-secret-prompt-marker"]


def test_move_to_silo_and_back(data_dir: Path) -> None:
    tid = _seed(data_dir)
    r = cli("tenants", "move", "acme", "--to", "silo")
    assert r.exit_code == 0, r.output
    assert (data_dir / "tenants" / f"{tid}.db").exists()
    assert oct((data_dir / "tenants" / f"{tid}.db").stat().st_mode & 0o777) == "0o600"
    con = sqlite3.connect(data_dir / "patinox.db")
    assert con.execute("SELECT count(*) FROM runs WHERE tenant_id = ?", (tid,)).fetchone() == (0,)
    con.close()
    assert cli("tenants", "move", "acme", "--to", "pool").exit_code == 0
    assert not (data_dir / "tenants" / f"{tid}.db").exists()
    assert "silo" not in cli("tenants", "list").output


def test_rotate_tenant_key_reencrypts_everything(data_dir: Path) -> None:
    tid = _seed(data_dir)
    r = cli("tenants", "rotate-key", "acme")
    assert r.exit_code == 0, r.output
    assert "DEK version 2" in r.output and "2 payloads re-encrypted" in r.output
    rt = Runtime.build(Settings.for_data_dir(data_dir))
    store = rt.backend.acting_on(tid)
    with store._tx() as conn:
        stored = conn.exec_driver_sql("SELECT input, output FROM runs").fetchall()
    assert all(store._sealer.version(v) == 2 for row in stored for v in row)
    assert store.list_runs()[0]["input"] == "a-secret-prompt-marker"


def test_rotate_kek_rewraps_and_data_stays_readable(data_dir: Path) -> None:
    tid = _seed(data_dir)
    r = cli("keys", "rotate-kek")
    assert r.exit_code == 0, r.output
    assert "KEK version 2 is current" in r.output
    rt = Runtime.build(Settings.for_data_dir(data_dir))
    assert rt.backend.acting_on(tid).list_runs()[0]["input"] == "a-secret-prompt-marker"


def test_worker_process_executes_queued_runs(data_dir: Path) -> None:
    """A run queued by one process is executed by `patinox worker`, another process."""
    import subprocess
    import sys
    import time

    tid = _seed(data_dir)
    rt = Runtime.build(Settings.for_data_dir(data_dir))
    from patinox.tenancy import TenantContext

    t = rt.tenants.get(tid)
    tctx = TenantContext(
        tenant_id=tid, principal="cli", scopes=frozenset({"runs:write"}), plan=t.plan, limits=t.limits
    )
    agent_id = rt.backend.acting_on(tid).list_agents()[0]["id"]
    queued = asyncio.run(
        rt.runs.start(tctx, agent_id, RunRequest(input="queued work", output_tokens=2, mode="async"))
    )
    assert queued["status"] == "queued"
    env = {**os.environ, "PATINOX_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "patinox", "worker", "--concurrency", "2"], env=env)
    try:
        for _ in range(300):
            if rt.backend.acting_on(tid).get_run(queued["id"])["status"] == "succeeded":
                break
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert rt.backend.acting_on(tid).get_run(queued["id"])["status"] == "succeeded"
    assert proc.returncode == 0
    assert rt.queue.depth(tid) == 0


def test_conformance_command_prints_its_closing_line() -> None:
    r = cli("conformance", "--model", "sqlite-pool", "--examples", "2")
    assert r.exit_code == 0, r.output
    last = [line for line in r.output.splitlines() if line.strip()][-1]
    assert last.endswith(" passed, 0 failed"), last
    assert int(last.split()[0]) >= 8


def test_conformance_command_refuses_an_unknown_model() -> None:
    r = cli("conformance", "--model", "vault")
    assert r.exit_code == 1 and "Traceback" not in r.output


def test_export_to_an_existing_file_is_refused_before_any_work(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(data_dir)
    monkeypatch.setenv("BUNDLE_PASS", "correct horse battery staple")
    bundle = tmp_path / "acme.bundle"
    bundle.write_bytes(b"keep me")
    r = cli("tenants", "export", "acme", str(bundle), "--passphrase-env", "BUNDLE_PASS")
    assert r.exit_code == 1
    assert "--overwrite" in r.output and "exporting" not in r.output
    assert bundle.read_bytes() == b"keep me"


def test_move_to_the_model_a_tenant_is_on_says_nothing_moved(data_dir: Path) -> None:
    _seed(data_dir)
    r = cli("tenants", "move", "acme", "--to", "pool")
    assert r.exit_code == 0, r.output
    assert "already on pool: nothing moved" in r.output and "rows copied" not in r.output
    assert cli("run", "acme", "helper", "still here", "--output-tokens", "2").exit_code == 0


def test_tenants_config_shows_each_setting_and_its_layer(data_dir: Path) -> None:
    assert cli("tenants", "create", "acme", "--plan", "pro").exit_code == 0
    assert cli("tenants", "update", "acme", "--limit", "tokens_per_day=4242").exit_code == 0
    r = cli("tenants", "config", "acme", "--json")
    assert r.exit_code == 0, r.output
    config = first_json(r.output)
    assert config["limits"]["tokens_per_day"]["value"] == 4242
    assert config["limits"]["tokens_per_day"]["source"] == "tenant"
    assert config["limits"]["max_agents"]["source"] == "plan"
    table = cli("tenants", "config", "acme")
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if "tokens_per_day" in line)
    assert "4242" in row and "tenant" in row
    missing = cli("tenants", "config", "nobody")
    assert missing.exit_code == 1 and "Traceback" not in missing.output
