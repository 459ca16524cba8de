"""``patinox secrets``: a value comes from standard input (never an argument) and is never
printed; set, rotate, list and delete."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from patinox.cli import app
from tests.cli.conftest import assert_error, cli

CANARY = "sk-canary-cli-0d9e8f7a"


def test_set_from_stdin_rotate_list_delete_never_print_the_value(acme: str, data_dir: Path) -> None:
    runner = CliRunner()
    set_ = runner.invoke(app, ["secrets", "set", "acme", "provider:openai"], input=CANARY + "\n")
    assert set_.exit_code == 0, set_.output
    assert "set (version 1)" in set_.output and CANARY not in set_.output
    again = runner.invoke(app, ["secrets", "set", "acme", "provider:openai"], input=CANARY + "-2")
    assert again.exit_code == 0 and "rotated (version 2)" in again.output
    listed = cli("secrets", "list", "acme")
    assert listed.exit_code == 0 and "provider:openai" in listed.stdout and CANARY not in listed.stdout
    from patinox.cli._deployment import open_runtime

    rt = open_runtime(data_dir)
    assert (
        rt.backend.acting_on(acme).secrets().value("provider:openai", actor="t", purpose="t") == CANARY + "-2"
    )
    assert cli("secrets", "delete", "acme", "provider:openai").exit_code == 0
    assert "provider:openai" not in cli("secrets", "list", "acme").stdout
    assert_error(cli("secrets", "delete", "acme", "provider:openai"), "not found")


def test_a_value_is_never_taken_as_an_argument(acme: str) -> None:
    result = cli("secrets", "set", "acme", "token", CANARY)
    assert result.exit_code != 0 and CANARY not in cli("secrets", "list", "acme").stdout
    assert_error(CliRunner().invoke(app, ["secrets", "set", "acme", "token"], input=""), "no value given")
