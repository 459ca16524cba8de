"""Every API test runs on every storage deployment unless it says otherwise."""

from __future__ import annotations

import pytest

from tests.conftest import ALL_DEPLOYMENTS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "deployment" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("only_deployments")
    names = marker.args if marker else ALL_DEPLOYMENTS
    metafunc.parametrize("deployment", names, indirect=True)
