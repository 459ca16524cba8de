"""`patinox run` passes the same admission as the HTTP route, the agent's run rate included
(it used to start runs past it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import cli, first_json


def test_the_agent_run_rate_holds_for_patinox_run(
    data_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each `patinox run` is a process of its own: with a shared rate-limit store, the
    agent's runs of every process count against one window."""
    monkeypatch.setenv("PATINOX_RATE_LIMIT_URL", redis_url)
    created = cli("tenants", "create", "acme", "--limit", "agent_runs_per_minute=1")
    assert created.exit_code == 0, created.output
    assert cli("agents", "create", "acme", "bot", "--model", "simulated:instant").exit_code == 0
    first = cli("run", "acme", "bot", "hello", "--output-tokens", "2")
    assert first.exit_code == 0, first.output
    assert first_json(first.output)["status"] == "succeeded"
    second = cli("run", "acme", "bot", "hello", "--output-tokens", "2")
    assert second.exit_code != 0
    assert "agent rate limit of 1 runs per minute reached" in second.output, second.output
