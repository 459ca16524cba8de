"""``--limit`` takes the model settings as text: ``allowed_models`` patterns separated by
spaces, ``default_model`` a model id; an agent outside them is refused."""

from __future__ import annotations

from pathlib import Path

from tests.cli.conftest import assert_error, cli, first_json


def test_model_settings_are_set_as_text(data_dir: Path) -> None:
    result = cli(
        "tenants",
        "create",
        "acme",
        "--limit",
        "allowed_models=simulated:instant simulated:ttft_ms=1,tpot_ms=1",
        "--limit",
        "default_model=simulated:instant",
    )
    assert result.exit_code == 0, result.output
    limits = first_json(result.stdout)["limits"]
    assert limits["allowed_models"] == ["simulated:instant", "simulated:ttft_ms=1,tpot_ms=1"]
    assert limits["default_model"] == "simulated:instant"
    refused = cli("agents", "create", "acme", "bot", "--model", "simulated")
    assert_error(refused, "not allowed")


def test_the_config_table_shows_the_allow_list_as_patterns(data_dir: Path) -> None:
    assert cli("tenants", "create", "acme", "--limit", "allowed_models=simulated* openai:*").exit_code == 0
    shown = cli("tenants", "config", "acme", width=300)
    assert shown.exit_code == 0, shown.output
    assert "simulated* openai:*" in shown.stdout and "('" not in shown.stdout
