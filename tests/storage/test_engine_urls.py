"""PostgreSQL URLs whose host is a Unix-socket directory reach psycopg as that directory.

libpq takes a socket directory as the host, either in the query (``?host=/run/pg``, empty
authority) or percent-encoded in the authority (``%2Frun%2Fpg``). SQLAlchemy passes an
authority host to the driver as written, so ``%2Frun%2Fpg`` would be looked up as a host
name. What the driver receives is read from the dialect itself.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine

from patinox.errors import ConfigurationError
from patinox.storage.engine import database_name, normalise_url, with_database


def _connect_args(url: str) -> dict[str, Any]:
    engine = create_engine(normalise_url(url))
    try:
        _, kwargs = engine.dialect.create_connect_args(engine.url)
    finally:
        engine.dispose()
    return {k: v for k, v in kwargs.items() if k in ("host", "port", "dbname", "user", "password")}


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app@/patinox?host=/run/pg sock",
        "postgresql://app@%2Frun%2Fpg%20sock/patinox",
        "postgres://app@%2frun%2fpg%20sock/patinox",
        "postgresql+psycopg://app@%2Frun%2Fpg%20sock/patinox",
    ],
)
def test_a_socket_directory_host_reaches_the_driver_as_a_directory(url: str) -> None:
    assert _connect_args(url) == {"host": "/run/pg sock", "dbname": "patinox", "user": "app"}


def test_the_port_of_a_socket_url_names_the_socket_file() -> None:
    args = _connect_args("postgresql://app:pw@%2Frun%2Fpg:5433/patinox")
    assert args == {"host": "/run/pg", "port": 5433, "dbname": "patinox", "user": "app", "password": "pw"}


@pytest.mark.parametrize(
    "url", ["postgresql://app@/patinox?host=/run/pg", "postgresql://app@%2Frun%2Fpg/patinox"]
)
def test_another_database_on_a_socket_server_keeps_the_socket(url: str) -> None:
    other = with_database(url, "patinox_tn_1")
    assert database_name(other) == "patinox_tn_1"
    assert _connect_args(other) == {"host": "/run/pg", "dbname": "patinox_tn_1", "user": "app"}


def test_tcp_urls_are_left_as_written() -> None:
    assert normalise_url("postgresql://app@127.0.0.1:5432/patinox") == (
        "postgresql+psycopg://app@127.0.0.1:5432/patinox"
    )
    assert normalise_url("postgresql+psycopg://app@db.internal/patinox") == (
        "postgresql+psycopg://app@db.internal/patinox"
    )
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"


def test_two_socket_hosts_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="two hosts"):
        normalise_url("postgresql://app@%2Frun%2Fa/patinox?host=/run/b")
