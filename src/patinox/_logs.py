"""Logging set-up of a server or worker process: structlog, one JSON object per line on stderr.

Called once at start-up by ``patinox serve`` and ``patinox worker``. An application that
embeds Patinox (``create_app``, the Python API) configures structlog itself, or leaves
structlog's defaults.

Each line carries ``event``, ``level`` and ``timestamp`` (ISO 8601, UTC) beside the event's
own fields. Events below the level are dropped at the call, before any field is rendered.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

from patinox.errors import ConfigurationError

__all__ = ["LEVELS", "LOG_LEVEL_ENV", "configure_logging"]

#: Environment variable naming the level when the caller gives none.
LOG_LEVEL_ENV = "PATINOX_LOG_LEVEL"
#: Level names accepted (case-insensitive) and their numbers.
LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure_logging(level: str | None = None, *, stream: TextIO | None = None) -> None:
    """Send every structlog event of this process to ``stream`` as one JSON line.

    Args:
        level: the least level logged (``debug``, ``info``, ``warning``, ``error``,
            ``critical``); default ``$PATINOX_LOG_LEVEL``, else ``info`` (every request).
        stream: where lines go; default ``sys.stderr``.

    Raises:
        ConfigurationError: ``level`` (or the variable) names no level.
    """
    name = (level or os.environ.get(LOG_LEVEL_ENV) or "info").strip().lower()
    if name not in LEVELS:
        raise ConfigurationError(
            f"log level {name!r} is not one of {', '.join(LEVELS)} (set by {LOG_LEVEL_ENV})",
            field=LOG_LEVEL_ENV,
        )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[name]),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
