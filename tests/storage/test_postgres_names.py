"""Names of PostgreSQL databases and roles that Patinox builds into DDL."""

from __future__ import annotations

import pytest

from patinox.errors import ConfigurationError
from patinox.storage.postgres import check_identifier


def test_an_identifier_is_matched_whole() -> None:
    """``re.match`` with ``$`` took ``"patinox\\n"`` for a safe identifier."""
    assert check_identifier("patinox_app", "app_role") == "patinox_app"
    for bad in ("patinox\n", "patinox\r\n", "\npatinox", "Patinox", "1db", "a" * 64, ""):
        with pytest.raises(ConfigurationError, match="lower-case letters"):
            check_identifier(bad, "database")
