"""CPU cores for dedicated tenants: reserved for one tenant, refused when none is free,
kept apart from shared work by the cpusets (on this host's real cgroups)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from patinox.errors import ConfigurationError, IsolationUnavailable
from patinox.isolation.cgroups import CgroupManager, detect_cgroups, parse_cpus
from patinox.isolation.cores import CoreAllocator
from patinox.tenancy.plans import PLANS
from tests.isolation._procs import gated, reap


def test_one_core_of_two_goes_to_one_tenant_and_the_next_is_refused() -> None:
    cores = CoreAllocator((0, 1))
    assert cores.reserve("tn_a", 1) == (1,)  # CPU 0 stays with shared work
    assert cores.shared() == (0,)
    with pytest.raises(IsolationUnavailable) as refused:
        cores.reserve("tn_b", 1)
    err = refused.value
    assert (err.requested_cores, err.free_cores, err.isolation_level) == (1, 0, "dedicated")
    assert "0 of this host's 2 are free" in err.message
    assert cores.reserve("tn_a", 1) == (1,)  # idempotent
    cores.release("tn_a")
    assert cores.shared() == (0, 1) and cores.reserved("tn_a") == ()
    assert cores.reserve("tn_b", 1) == (1,)


def test_a_tenant_keeps_its_cores_when_its_count_changes() -> None:
    cores = CoreAllocator(tuple(range(8)), keep_shared=2)
    assert cores.reserve("tn_a", 2) == (6, 7)
    assert cores.reserve("tn_b", 3) == (3, 4, 5)
    assert cores.reserve("tn_a", 3) == (2, 6, 7)  # grows, keeps 6 and 7
    assert cores.reserve("tn_a", 1) == (7,)  # shrinks inside what it had
    assert cores.free_count() == 2 and cores.shared() == (0, 1, 2, 6)
    with pytest.raises(IsolationUnavailable) as refused:
        cores.reserve("tn_c", 3)
    assert refused.value.free_cores == 2
    with pytest.raises(ConfigurationError):
        cores.reserve("tn_c", 0)


def test_defaults_to_the_cpus_this_process_may_use_and_reports_them() -> None:
    cores = CoreAllocator()
    assert cores.cpus == tuple(sorted(os.sched_getaffinity(0)))
    [line] = cores.checks()
    assert line.name == "free cores for dedicated tenants"
    assert line.ok == (len(cores.cpus) > 1) and str(len(cores.cpus) - 1) in line.detail
    if len(cores.cpus) > 1:
        cores.reserve("tn_a", len(cores.cpus) - 1)
    [full] = cores.checks()
    assert not full.ok and full.fix is not None


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    support = detect_cgroups()
    assert support.enforces("cpuset"), "\n".join(support.problems)
    manager = CgroupManager(support, prefix=f"patinox-test-{secrets.token_hex(4)}")
    yield manager
    manager.remove_all()


def _allowed(pid: int) -> tuple[int, ...]:
    status = Path(f"/proc/{pid}/status").read_text()
    return parse_cpus(status.split("Cpus_allowed_list:")[1].splitlines()[0])


def test_a_dedicated_tenant_runs_on_its_core_and_the_others_keep_off_it(manager: CgroupManager) -> None:
    cores = CoreAllocator()
    assert len(cores.cpus) >= 2, "a dedicated core needs a host with two CPUs or more"
    limits = PLANS["enterprise"].limits
    dedicated = manager.tenant("tn_ded", limits, cpus=cores.reserve("tn_ded", limits.dedicated_cores))
    shared = manager.tenant("tn_shared", PLANS["free"].limits, cpus=cores.shared())
    procs = [gated("import time\ntime.sleep(600)") for _ in range(2)]
    try:
        dedicated.child("w0").attach(procs[0].pid)
        shared.child("w0").attach(procs[1].pid)
        mine, theirs = set(_allowed(procs[0].pid)), set(_allowed(procs[1].pid))
        assert mine == set(cores.reserved("tn_ded")) and len(mine) == 1
        assert theirs == set(cores.shared()) and not mine & theirs
    finally:
        for proc in procs:
            reap(proc)


def test_patinox_own_threads_can_be_kept_on_the_shared_cores() -> None:
    script = (
        "import threading, time\n"
        "from pathlib import Path\n"
        "from patinox.isolation.cores import CoreAllocator\n"
        "from patinox.isolation.cgroups import parse_cpus\n"
        "stop = threading.Event()\n"
        "worker = threading.Thread(target=stop.wait)\n"
        "worker.start()\n"
        "cores = CoreAllocator()\n"
        "cores.reserve('tn_ded', 1)\n"
        "print(cores.confine_this_process())\n"
        "for task in sorted(Path('/proc/self/task').iterdir()):\n"
        "    status = (task / 'status').read_text()\n"
        "    print(parse_cpus(status.split('Cpus_allowed_list:')[1].splitlines()[0]))\n"
        "stop.set()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    confined, *threads = done.stdout.splitlines()
    assert len(threads) >= 2 and set(threads) == {confined}
    assert str(max(os.sched_getaffinity(0))) not in confined.strip("(),").split(", ")
