"""The HTTP API."""

from patinox.api._runtime import Runtime, Settings
from patinox.api.app import create_app

__all__ = ["Runtime", "Settings", "create_app"]
