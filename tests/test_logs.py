"""A server or worker process logs JSON lines on stderr, at the level PATINOX_LOG_LEVEL names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import structlog

from patinox._logs import configure_logging
from patinox.errors import ConfigurationError

_EMIT = """
import structlog
from patinox._logs import configure_logging
configure_logging()
log = structlog.get_logger("test")
log.debug("quiet", n=0)
log.info("request", n=1)
log.error("dependency_failed", n=2)
"""


def _run(level: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PATINOX_LOG_LEVEL"}
    if level is not None:
        env["PATINOX_LOG_LEVEL"] = level
    return subprocess.run([sys.executable, "-c", _EMIT], env=env, capture_output=True, text=True, check=True)


def test_events_are_json_lines_on_stderr_at_info_by_default() -> None:
    out = _run(None)
    assert out.stdout == ""
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [(e["event"], e["level"], e["n"]) for e in lines] == [
        ("request", "info", 1),
        ("dependency_failed", "error", 2),
    ]
    assert all(e["timestamp"].endswith("Z") for e in lines)


@pytest.mark.parametrize(("level", "events"), [("debug", 3), ("WARNING", 1), ("critical", 0)])
def test_the_level_comes_from_patinox_log_level(level: str, events: int) -> None:
    assert len(_run(level).stderr.splitlines()) == events


def test_an_unknown_level_is_refused_before_anything_changes() -> None:
    before = structlog.get_config()
    with pytest.raises(ConfigurationError, match="PATINOX_LOG_LEVEL"):
        configure_logging("loud")
    assert structlog.get_config() == before
