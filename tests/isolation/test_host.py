"""Which isolation levels a host offers follows from what was probed, never from hope."""

from __future__ import annotations

from pathlib import Path

import pytest

from patinox.errors import ConfigurationError
from patinox.isolation.cgroups import CgroupSupport
from patinox.isolation.checks import Check
from patinox.isolation.host import HostSupport, detect_host
from patinox.runtime import Settings
from patinox.tenancy import IsolationLevel

_SANDBOX_OK = tuple(
    Check(name=n, ok=True, detail="works")
    for n in (
        "bubblewrap",
        "bubblewrap sandbox starts",
        "PID namespace",
        "network namespace",
        "Python in a tenant sandbox",
    )
)


def _host(
    *,
    sandbox: tuple[Check, ...] = _SANDBOX_OK,
    free_cores: int = 1,
    controllers: frozenset[str] = frozenset(),
) -> HostSupport:
    cgroups = CgroupSupport(
        version="v1" if controllers else None,
        root=Path("/sys/fs/cgroup"),
        controllers=controllers,
        problems=(),
    )
    return HostSupport(cgroups=cgroups, sandbox=sandbox, cores=(), free_cores=free_cores)


def test_every_level_when_the_sandbox_works_and_a_core_is_free() -> None:
    assert _host().levels() == frozenset(IsolationLevel)


def test_no_container_when_any_sandbox_line_fails() -> None:
    for failing in range(len(_SANDBOX_OK)):
        lines = tuple(
            Check(name=c.name, ok=i != failing, detail="x", fix=None if i != failing else "fix it")
            for i, c in enumerate(_SANDBOX_OK)
        )
        levels = _host(sandbox=lines).levels()
        assert IsolationLevel.CONTAINER not in levels, lines[failing].name
        assert IsolationLevel.DEDICATED not in levels
        assert IsolationLevel.PROCESS in levels


def test_no_dedicated_without_a_free_core() -> None:
    levels = _host(free_cores=0).levels()
    assert IsolationLevel.CONTAINER in levels
    assert IsolationLevel.DEDICATED not in levels


def test_mechanism_names_rlimits_when_no_controller_is_writable() -> None:
    assert _host().mechanism() == "rlimits only (no writable cgroup controller)"
    assert (
        _host(controllers=frozenset({"memory", "pids"})).mechanism() == "cgroup v1 (memory, pids) and rlimits"
    )


def test_this_host_is_probed_for_real() -> None:
    host = detect_host()
    names = [c.name for c in host.checks()]
    assert "cgroup version" in names and "bubblewrap" in names
    assert IsolationLevel.NAMESPACE in host.levels()


def test_the_deployment_setting_names_how_many_spares_and_refuses_a_non_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATINOX_EXEC_SPARES", "0")
    assert Settings.for_data_dir(tmp_path).exec_spares == 0
    monkeypatch.setenv("PATINOX_EXEC_SPARES", "two")
    with pytest.raises(ConfigurationError, match="PATINOX_EXEC_SPARES"):
        Settings.for_data_dir(tmp_path)
    monkeypatch.delenv("PATINOX_EXEC_SPARES")
    assert Settings.for_data_dir(tmp_path).exec_spares == 1


def test_the_deployment_may_offer_fewer_levels_and_names_a_wrong_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATINOX_ISOLATION_LEVELS", "process, container")
    assert Settings.for_data_dir(tmp_path).isolation_levels == {
        IsolationLevel.NAMESPACE,
        IsolationLevel.PROCESS,
        IsolationLevel.CONTAINER,
    }
    monkeypatch.setenv("PATINOX_ISOLATION_LEVELS", "process,vm")
    with pytest.raises(ConfigurationError, match="'vm'"):
        Settings.for_data_dir(tmp_path)
    monkeypatch.setenv("PATINOX_ISOLATION_LEVELS", "")
    assert Settings.for_data_dir(tmp_path).isolation_levels is None
