"""CLI tests: every command runs through ``typer.testing.CliRunner`` on a fresh data dir."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from typer.testing import CliRunner, Result

from patinox.cli import app

_ENV_VARS = (
    "PATINOX_DATA_DIR",
    "PATINOX_DATABASE_URL",
    "PATINOX_OWNER_URL",
    "PATINOX_KEK_URL",
    "PATINOX_RATE_LIMIT_URL",
    "PATINOX_ADMIN_KEY",
    "PATINOX_LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No deployment settings leak in from the developer's shell, and none out: ``serve``
    configures structlog for its process (JSON on the stderr of the moment), which is put
    back as it was for the tests after this one."""
    for var in _ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    yield
    structlog.reset_defaults()


def cli(*args: str, width: int = 200) -> Result:
    """Run ``patinox ARGS`` in-process; help and errors are rendered ``width`` columns wide."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(width), "TERMINAL_WIDTH": str(width)})


def first_json(text: str) -> Any:
    """The first JSON value printed in ``text``."""
    start = min(i for i in (text.find("{"), text.find("[")) if i >= 0)
    return json.JSONDecoder().raw_decode(text[start:])[0]


def assert_error(result: Result, *fragments: str, exit_code: int = 1) -> None:
    """The command failed cleanly: the exit code, no traceback, every fragment in the output."""
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An initialised deployment, set as ``PATINOX_DATA_DIR`` for the test."""
    ddir = tmp_path / "deployment"
    result = cli("init", "--data-dir", str(ddir), "--key-file", str(tmp_path / "operator.key"))
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("PATINOX_DATA_DIR", str(ddir))
    return ddir


@pytest.fixture
def acme(data_dir: Path) -> str:
    """A tenant ``acme`` with an agent ``bot`` on the instant simulated model; its id."""
    result = cli("tenants", "create", "acme")
    assert result.exit_code == 0, result.output
    result = cli("agents", "create", "acme", "bot", "--model", "simulated:instant")
    assert result.exit_code == 0, result.output
    return str(first_json(cli("tenants", "show", "acme").stdout)["id"])
