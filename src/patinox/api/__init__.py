"""The HTTP API."""

from patinox.api.app import create_app
from patinox.runtime import Runtime, Settings

__all__ = ["Runtime", "Settings", "create_app"]
