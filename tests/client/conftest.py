"""The client's tests run on a SQLite and a PostgreSQL pool deployment unless they say otherwise."""

from __future__ import annotations

import pytest


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "deployment" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("only_deployments")
    names = marker.args if marker else ("sqlite-pool", "pg-pool")
    metafunc.parametrize("deployment", names, indirect=True)
