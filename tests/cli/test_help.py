"""Help output: plain flags, the version option, no stray line breaks."""

from __future__ import annotations

import pytest

from tests.cli.conftest import cli


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["keys", "create"], "--operator"),
        (["tenants", "list"], "--all"),
        (["tenants", "delete"], "--yes"),
        ([], "--version"),
        ([], "--help"),
        (["demo"], "--help"),
    ],
)
def test_boolean_flags_show_as_plain_flags(command: list[str], flag: str) -> None:
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert flag in result.output
    assert "<bool>" not in result.output
    assert "--no-" not in result.output


def test_command_list_has_no_stray_line_break() -> None:
    lines = cli("--help").output.splitlines()
    rows = [line for line in lines if line.startswith("│ ")]
    start = next(i for i, line in enumerate(rows) if line.startswith("│ init "))
    for line in rows[start:]:
        assert line[2] != " ", f"continuation line in the command list: {line!r}"
