"""Conformance tests run on every storage deployment unless they name their own."""

from __future__ import annotations

import pytest

from tests.conftest import ALL_DEPLOYMENTS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "deployment" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        if "deployment" in str(mark.args[0]):
            return
    marker = metafunc.definition.get_closest_marker("only_deployments")
    metafunc.parametrize("deployment", marker.args if marker else ALL_DEPLOYMENTS, indirect=True)
