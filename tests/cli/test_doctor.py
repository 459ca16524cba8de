"""``patinox doctor`` probes this host for real and says what it can enforce."""

from __future__ import annotations

import os

import pytest

from tests.cli.conftest import cli


@pytest.mark.skipif(os.geteuid() != 0, reason="the lines differ for a non-root user; CI runs as root")
def test_doctor_lists_every_mechanism_and_the_levels_it_allows() -> None:
    result = cli("doctor", width=400)
    assert result.exit_code == 0, result.output
    for line in (
        "cgroup version",
        "cgroup memory controller",
        "cgroup pids controller",
        "running as root",
        "tmpfs working directories",
        "bubblewrap",
        "PID namespace",
        "network namespace",
        "free cores for dedicated tenants",
    ):
        assert line in result.output, result.output
    assert "execution limits: cgroup" in result.output
    assert "isolation levels on this host: namespace, process" in result.output


def test_doctor_strict_fails_when_a_line_is_missing() -> None:
    """``--strict`` turns any missing line into exit code 1 (a host with every line ok
    exits 0)."""
    result = cli("doctor", "--strict", width=400)
    missing = "missing" in result.output
    assert result.exit_code == (1 if missing else 0), result.output
