"""What commands print: one JSON timestamp format, the simulated flag, readable tables."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from patinox import __version__
from patinox.replay import render_table
from patinox.replay.runner import ReplayReport, TenantReport
from tests.cli.conftest import cli, first_json
from tests.conftest import Deployment


def _assert_utc_z(value: Any) -> None:
    assert isinstance(value, str) and value.endswith("Z") and "+00:00" not in value, value


def test_timestamps_print_one_way(acme: str) -> None:
    tenant = first_json(cli("tenants", "show", "acme").stdout)
    _assert_utc_z(tenant["created_at"])
    key = first_json(cli("keys", "create", "acme").stdout)
    _assert_utc_z(key["created_at"])
    assert "secret_hash" not in key
    agent = first_json(cli("agents", "create", "acme", "helper").stdout)
    _assert_utc_z(agent["created_at"])
    _assert_utc_z(agent["updated_at"])


def test_agents_and_runs_say_they_are_simulated(acme: str) -> None:
    agent = first_json(cli("agents", "create", "acme", "helper", "--model", "simulated:instant").stdout)
    assert agent["simulated"] is True
    result = cli("run", "acme", "helper", "hello there", "--output-tokens", "3")
    assert result.exit_code == 0, result.output
    run = first_json(result.stdout)
    assert run["simulated"] is True and run["status"] == "succeeded" and run["output_tokens"] == 3


def test_run_help_says_what_is_counted_where() -> None:
    text = " ".join(cli("run", "--help", width=400).output.split())
    assert "same admission path" not in text
    assert "request rate limit is counted in each server process only" in text
    assert "not counted against a running server's request rate" in text
    assert "For production traffic use the HTTP API" in text


def test_init_keeps_the_deployment_private(tmp_path: Path) -> None:
    ddir = tmp_path / "deployment"
    result = cli("init", "--data-dir", str(ddir), "--key-file", str(tmp_path / "op.key"))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(ddir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ddir / "patinox.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "op.key").st_mode) == 0o600


def test_init_tightens_an_existing_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "op.key"
    key_file.write_text("old\n")
    key_file.chmod(0o644)
    result = cli("init", "--data-dir", str(tmp_path / "deployment"), "--key-file", str(key_file))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert key_file.read_text().startswith("ptx_")


def test_version() -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"patinox {__version__}" == "patinox 0.1.0"


def _report() -> ReplayReport:
    def tenant(source: str, plan: str, tid: str, **kw: Any) -> TenantReport:
        base: dict[str, Any] = {
            "tenant_id": tid,
            "source": source,
            "plan": plan,
            "model": "simulated",
            "sent": 1138,
            "completed": 1138,
            "throttled": 0,
            "failed": 0,
            "p50_ms": 458.78,
            "p99_ms": 1249.89,
            "tokens_in": 1184122,
            "tokens_out": 277576,
            "error_codes": {},
        }
        return TenantReport(**{**base, **kw})

    return ReplayReport(
        trace="azure-llm-2023",
        compression=4.0,
        wall_time_s=61.6,
        trace_duration_s=239.9,
        max_output_tokens=None,
        clamped_requests=0,
        max_send_lag_ms=7.2,
        tenants=[
            tenant(
                "azure-code",
                "free",
                "tn_agrcpi5uliexh4kfauziwppzcu",
                sent=594,
                completed=89,
                throttled=505,
                error_codes={"concurrency_limited": 30, "rate_limited": 475},
            ),
            tenant("azure-conv", "pro", "tn_agrcpi5ulr4gunge5lgu5xsx7m"),
        ],
    )


def test_replay_table_fits_80_columns() -> None:
    console = Console(file=io.StringIO(), width=80, record=True)
    console.print(render_table(_report()))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "tn_agrcpi5uliexh4kfauziwppzcu" not in text  # the JSON report keeps the ids
    for value in ("azure-code", "azure-conv", "1,184,122", "277,576", "1,138", "rate_limited=475"):
        assert value in text, value
    # each tenant on one line, numbers unwrapped
    assert any(all(v in line for v in ("azure-code", "594", "89", "505", "1,184,122")) for line in lines)
    assert any("azure-conv" in line and "1,184,122" in line and "277,576" in line for line in lines)


@pytest.mark.parametrize("deployment", ["pg-pool"], indirect=True)
def test_init_twice_names_the_database_it_found_initialised(deployment: Deployment, tmp_path: Path) -> None:
    # On PostgreSQL the deployment is the database, not the (empty) data directory. Run as
    # a process, as an operator would: the CLI leaves closing its connections to the exit.
    env = {
        **os.environ,
        "PATINOX_DATABASE_URL": deployment.db_url,
        "PATINOX_OWNER_URL": deployment.owner_url or "",
        "PATINOX_KEK_URL": f"file://{tmp_path / 'kek.json'}",
        "COLUMNS": "400",
    }
    ddir = str(tmp_path / "deployment")

    def init() -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "patinox", "init", "--data-dir", ddir]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    first = init()
    assert first.returncode == 0, first.stderr
    again = init()
    assert again.returncode == 1
    text = " ".join(again.stderr.split())
    assert "postgresql+psycopg://" in text and f"(data directory {ddir}) is already initialised" in text


def test_init_twice_on_sqlite_names_the_data_directory(tmp_path: Path) -> None:
    ddir = str(tmp_path / "deployment")
    assert cli("init", "--data-dir", ddir, "--key-file", str(tmp_path / "op.key")).exit_code == 0
    again = cli("init", "--data-dir", ddir)
    assert again.exit_code == 1
    assert f"{ddir} is already initialised" in " ".join(again.output.split())
