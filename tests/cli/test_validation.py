"""Invalid specs are reported one line per problem, named as the user typed them."""

from __future__ import annotations

from pathlib import Path

import pytest

from patinox.tenancy import LimitOverrides
from tests.cli.conftest import assert_error, cli, first_json


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_bad_tenant_name(data_dir: Path) -> None:
    result = cli("tenants", "create", "Bad_Name!")
    assert_error(result, "error: name: use 1-63 lowercase letters")
    assert len(_error_lines(result.output)) == 1
    assert "validation error" not in result.output and "pydantic" not in result.output


def test_limit_below_its_minimum(data_dir: Path) -> None:
    result = cli("tenants", "create", "acme", "--limit", "requests_per_minute=-5")
    assert_error(result, "error: --limit requests_per_minute: must be >= 1")
    assert len(_error_lines(result.output)) == 1


def test_every_bad_limit_is_reported(data_dir: Path) -> None:
    result = cli(
        "tenants", "create", "acme", "--limit", "requests_per_minute=0", "--limit", "run_timeout_s=0"
    )
    assert_error(result, "--limit requests_per_minute: must be >= 1", "--limit run_timeout_s: must be > 0")
    assert len(_error_lines(result.output)) == 2


def test_unknown_limit_lists_the_valid_names(data_dir: Path) -> None:
    result = cli("tenants", "create", "acme", "--limit", "foo=1")
    assert_error(result, "error: --limit foo: unknown limit")
    for name in LimitOverrides.model_fields:
        assert name in result.output


def test_limit_help_lists_the_valid_names(data_dir: Path) -> None:
    for command in (["tenants", "create"], ["tenants", "update"]):
        result = cli(*command, "--help", width=400)
        assert result.exit_code == 0
        for name in LimitOverrides.model_fields:
            assert name in result.output, (command, name)


def test_limit_accepts_exponents_and_spaces(data_dir: Path) -> None:
    result = cli(
        "tenants", "create", "acme", "--limit", " tokens_per_day = 1e6 ", "--limit", "run_timeout_s=2.5"
    )
    assert result.exit_code == 0, result.output
    tenant = first_json(result.stdout)
    assert tenant["limit_overrides"] == {"tokens_per_day": 1_000_000, "run_timeout_s": 2.5}
    assert tenant["limits"]["tokens_per_day"] == 1_000_000


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("max_concurrent_runs=1.5", "--limit max_concurrent_runs: must be a whole number, got '1.5'"),
        ("max_concurrent_runs=many", "--limit max_concurrent_runs: needs a number, got 'many'"),
        ("run_timeout_s=inf", "--limit run_timeout_s: needs a finite number, got 'inf'"),
        ("max_concurrent_runs", "--limit takes NAME=VALUE, got 'max_concurrent_runs'"),
    ],
)
def test_limit_values_that_are_not_numbers(data_dir: Path, pair: str, message: str) -> None:
    assert_error(cli("tenants", "create", "acme", "--limit", pair), f"error: {message}")


def test_bad_agent_name(acme: str) -> None:
    result = cli("agents", "create", "acme", "Bad Name")
    assert_error(result, "error: name: use letters, digits")
    assert len(_error_lines(result.output)) == 1


def test_python_tool_below_container_names_the_level_needed(acme: str) -> None:
    result = cli("agents", "create", "acme", "coder", "--tool", "python")
    assert_error(result, "error: tool 'python' needs isolation level 'container'", "'namespace'")
    assert len(_error_lines(result.output)) == 1
    assert "coder" not in cli("agents", "list", "acme").stdout


def test_update_with_nothing_names_the_flags(acme: str) -> None:
    assert_error(
        cli("tenants", "update", "acme"),
        "error: nothing to update: give --plan, --limit and/or --isolation-level",
    )


@pytest.mark.parametrize(
    ("flag", "scheme"),
    [
        ("--database-url", "sqlite"),
        ("--admin-url", "sqlite"),
        ("env", "sqlite"),  # PATINOX_CONFORMANCE_ADMIN_URL
        ("--database-url", "mysql"),
        ("--database-url", ""),
    ],
)
def test_conformance_refuses_a_database_url_that_is_not_postgresql(
    flag: str, scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--database-url sqlite:///...`` was taken for PostgreSQL: the suite then printed 35
    failures about ``pg_roles``. A URL that is not PostgreSQL is refused before any check
    runs (nothing is opened or created), saying that SQLite is always checked."""
    db = tmp_path / "patinox.db"
    url = {"sqlite": f"sqlite:///{db}", "mysql": "mysql://root:secret@127.0.0.1/db", "": ""}[scheme]
    if flag == "env":
        monkeypatch.setenv("PATINOX_CONFORMANCE_ADMIN_URL", url)
        result = cli("conformance", "--model", "pg-pool", "--examples", "1")
    else:
        result = cli("conformance", flag, url, "--model", "pg-pool", "--examples", "1")
    assert_error(result, "PostgreSQL URL", "SQLite pool and silo are always checked")
    assert "FAIL" not in result.output and "pg_roles" not in result.output
    assert "secret" not in result.output  # the URL's password is not echoed
    assert list(tmp_path.iterdir()) == []
