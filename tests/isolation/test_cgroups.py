"""Per-tenant cgroups on this host's real hierarchies: the limits stop what they claim to
stop (memory, processes, CPU time, CPU placement), accounting follows what ran, nothing is
left behind, and a process that dropped root cannot touch its own limits.

Runs as root on a host with writable cgroups (CI and the development machine); a host
without them fails here with the fix (``patinox doctor`` says the same), never skips.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import resource
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from patinox.errors import ConfigurationError, IsolationFailed, IsolationUnavailable
from patinox.isolation.cgroups import (
    CONTROLLERS,
    CgroupManager,
    CgroupSupport,
    TenantCgroup,
    cpus_text,
    detect_cgroups,
    parse_cpus,
    rlimits_for,
)
from patinox.tenancy.plans import PLANS, ResourceLimits
from tests.isolation._procs import as_user, gated, reap, release

MiB = 2**20
NOBODY = 65534


@pytest.fixture(scope="module")
def support() -> CgroupSupport:
    found = detect_cgroups()
    missing = [c for c in CONTROLLERS if not found.enforces(c)]
    assert not missing, "these tests need writable cgroups (run as root):\n" + "\n".join(found.problems)
    return found


@pytest.fixture
def manager(support: CgroupSupport) -> Iterator[CgroupManager]:
    manager = CgroupManager(support, prefix=f"patinox-test-{secrets.token_hex(4)}")
    yield manager
    manager.remove_all()
    left = [p for d in manager.group_dirs() for p in glob.glob(str(d))]
    assert not left, f"cgroups left behind: {left}"


def limits(**changes: object) -> ResourceLimits:
    return PLANS["free"].limits.model_copy(update={"cpu_quota_cores": None, **changes})


def group_file(support: CgroupSupport, controller: str, manager: CgroupManager, *parts: str) -> Path:
    hierarchy = support.hierarchy_of(controller)
    assert hierarchy is not None
    return hierarchy.mount / manager.prefix / Path(*parts)


def start_in(group: TenantCgroup, name: str, code: str) -> tuple[subprocess.Popen[str], str, str]:
    """Run ``code`` in a fresh process inside ``group``'s child ``name``; (proc, out, err)."""
    child = group.child(name)
    proc = gated(code)
    try:
        child.attach(proc.pid)
        out, err = release(proc)
    finally:
        reap(proc)
    return proc, out, err


# --- detection ---------------------------------------------------------------------------


def test_detection_finds_each_controller_where_this_process_sits_in_it(support: CgroupSupport) -> None:
    own = Path("/proc/self/cgroup").read_text().splitlines()
    for controller in CONTROLLERS:
        hierarchy = support.hierarchy_of(controller)
        assert hierarchy is not None and hierarchy.writable, controller
        assert (hierarchy.mount / "cgroup.procs").exists()
        if hierarchy.version == "v1":  # "4:memory:/path", co-mounted: "3:cpu,cpuacct:/"
            assert any(controller in line.split(":")[1].split(",") for line in own), controller
        else:
            assert any(line.startswith("0::") for line in own)
    assert support.version in ("v1", "v2")
    assert support.problems == ()


def test_checks_say_version_controllers_root_and_tmpfs(support: CgroupSupport) -> None:
    lines = support.checks()
    names = [c.name for c in lines]
    assert names == [
        "cgroup version",
        *(f"cgroup {c} controller" for c in CONTROLLERS),
        "running as root",
        "tmpfs working directories",
    ]
    assert all(c.ok and c.fix is None for c in lines), lines
    assert support.version is not None and support.version in lines[0].detail


def test_a_process_that_is_not_root_sees_no_writable_controller_and_the_fix() -> None:
    seen = as_user(
        NOBODY,
        NOBODY,
        lambda: [(c.name, c.ok, c.fix) for c in detect_cgroups().checks()],
    )
    by_name = {name: (ok, fix) for name, ok, fix in seen}
    for controller in CONTROLLERS:
        ok, fix = by_name[f"cgroup {controller} controller"]
        assert not ok and fix is not None and "run Patinox as root" in fix
    assert by_name["running as root"][0] is False
    assert by_name["tmpfs working directories"][0] is False


def test_cpu_lists_round_trip() -> None:
    assert parse_cpus("0-2,5\n") == (0, 1, 2, 5)
    assert cpus_text((5, 0, 1, 2)) == "0-2,5"
    assert cpus_text(parse_cpus("1,3-4")) == "1,3-4"


# --- limits ------------------------------------------------------------------------------


def test_limits_are_written_in_each_controller(support: CgroupSupport, manager: CgroupManager) -> None:
    manager.tenant(
        "tn_a", limits(exec_memory_bytes=96 * MiB, cpu_weight=400, cpu_quota_cores=0.5, max_processes=32)
    )
    memory = support.hierarchy_of("memory")
    assert memory is not None
    if memory.version == "v1":
        assert (
            int(group_file(support, "memory", manager, "tn_a", "memory.limit_in_bytes").read_text())
            == 96 * MiB
        )
        memsw = group_file(support, "memory", manager, "tn_a", "memory.memsw.limit_in_bytes")
        if memsw.exists():  # swap accounting on: swap cannot dodge the limit
            assert int(memsw.read_text()) == 96 * MiB
        assert group_file(support, "cpu", manager, "tn_a", "cpu.shares").read_text().strip() == "4096"
        assert group_file(support, "cpu", manager, "tn_a", "cpu.cfs_quota_us").read_text().strip() == "50000"
    else:
        assert group_file(support, "memory", manager, "tn_a", "memory.max").read_text().strip() == str(
            96 * MiB
        )
        assert group_file(support, "cpu", manager, "tn_a", "cpu.max").read_text().split() == [
            "50000",
            "100000",
        ]
    assert group_file(support, "pids", manager, "tn_a", "pids.max").read_text().strip() == "32"


def test_update_raises_and_lowers_memory_in_either_order(
    support: CgroupSupport, manager: CgroupManager
) -> None:
    tenant = manager.tenant("tn_a", limits(exec_memory_bytes=64 * MiB))
    for size in (256 * MiB, 32 * MiB, 128 * MiB):  # memsw must stay >= memory on v1
        tenant.update(limits(exec_memory_bytes=size))
        name = "memory.limit_in_bytes" if support.version == "v1" else "memory.max"
        assert int(group_file(support, "memory", manager, "tn_a", name).read_text()) == size
    tenant.update(limits(cpu_quota_cores=None))
    if support.version == "v1":
        assert group_file(support, "cpu", manager, "tn_a", "cpu.cfs_quota_us").read_text().strip() == "-1"


def test_memory_limit_oom_kills_the_process_and_the_kill_is_counted(manager: CgroupManager) -> None:
    tenant = manager.tenant("tn_mem", limits(exec_memory_bytes=64 * MiB))
    assert tenant.oom_kills() == 0
    proc, out, _ = start_in(tenant, "w0", "b = b'x' * (200 * 2**20)\nprint('survived', len(b))")
    assert proc.returncode == -9 and "survived" not in out
    worker = tenant.child("w0")
    assert worker.oom_kills() >= 1
    assert tenant.oom_kills() >= 1
    assert 0 < worker.memory_peak_bytes() <= 64 * MiB
    # Removing the process group keeps its kills counted for the tenant (H1 tells
    # memory_limit from a crash by the tenant's count rising).
    before = tenant.oom_kills()
    worker.remove()
    assert tenant.oom_kills() == before


def test_a_process_within_its_memory_limit_runs_and_its_peak_is_measured(manager: CgroupManager) -> None:
    tenant = manager.tenant("tn_mem", limits(exec_memory_bytes=128 * MiB))
    worker = tenant.child("w0")
    worker.reset_peak()
    proc, out, _ = start_in(tenant, "w0", "b = b'x' * (40 * 2**20)\nprint('ok', len(b))")
    assert proc.returncode == 0 and out.startswith("ok")
    assert worker.memory_peak_bytes() >= 40 * MiB
    assert worker.oom_kills() == 0 and tenant.oom_kills() == 0
    worker.reset_peak()  # the next run starts from what the group holds now
    assert worker.memory_peak_bytes() < 40 * MiB


FORK_BOMB = """
import os
read_end, write_end = os.pipe()
kids, refused = [], 0
for _ in range(40):
    try:
        pid = os.fork()
    except BlockingIOError:
        refused += 1
        continue
    if pid == 0:
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    kids.append(pid)
os.close(write_end)
for pid in kids:
    os.waitpid(pid, 0)
print(len(kids), refused)
"""


def test_pids_max_stops_a_fork_bomb(manager: CgroupManager) -> None:
    tenant = manager.tenant("tn_fork", limits(max_processes=8))
    proc, out, err = start_in(tenant, "w0", FORK_BOMB)
    assert proc.returncode == 0, err
    forked, refused = map(int, out.split())
    assert forked <= 7 and refused >= 33  # 8 processes: the bomb and 7 children
    assert tenant.pids() == []


def test_cpu_seconds_follow_a_spinning_process(manager: CgroupManager) -> None:
    tenant = manager.tenant("tn_cpu", limits())
    worker = tenant.child("w0")
    assert worker.cpu_seconds() == 0
    proc, _, err = start_in(
        tenant, "w0", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    )
    assert proc.returncode == 0, err
    assert worker.cpu_seconds() >= 0.25  # 0.3 s spun after it entered the group
    assert tenant.cpu_seconds() >= worker.cpu_seconds()


def test_cpu_quota_throttles(support: CgroupSupport, manager: CgroupManager) -> None:
    tenant = manager.tenant("tn_quota", limits(cpu_quota_cores=0.2))
    stat = group_file(support, "cpu", manager, "tn_quota", "cpu.stat")
    assert _stat(stat, "nr_throttled") == 0
    proc, _, err = start_in(
        tenant, "w0", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    )
    assert proc.returncode == 0, err
    # 0.3 CPU seconds at 0.02 s per 0.1 s period cannot fit without being throttled.
    assert _stat(stat, "nr_throttled") > 0


def _stat(path: Path, key: str) -> int:
    return dict((k, int(v)) for k, v in (line.split() for line in path.read_text().splitlines()))[key]


def test_cpuset_pins_processes_and_follows_updates(manager: CgroupManager) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    first, last = (cpus[-1],), (cpus[0],)
    tenant = manager.tenant("tn_pin", limits(), cpus=first)
    worker = tenant.child("w0")
    proc = gated("import os, sys\nprint(sorted(os.sched_getaffinity(0)))\nsys.stdin.readline()")
    try:
        worker.attach(proc.pid)
        assert _allowed(proc.pid) == first
        tenant.update(limits(), cpus=last)  # v1: the child's cpus move inside the parent's
        assert _allowed(proc.pid) == last
        # Not even root inside the group can run outside it.
        with pytest.raises(OSError) as refused:
            os.sched_setaffinity(proc.pid, first if first != last else (cpus[-1] + 1,))
        assert refused.value.errno == errno.EINVAL
        tenant.update(limits(), cpus=None)  # unpinned: every CPU of the parent again
        assert _allowed(proc.pid) == tuple(cpus)
    finally:
        reap(proc)


def _allowed(pid: int) -> tuple[int, ...]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpus(line.split(":")[1])
    raise AssertionError("no Cpus_allowed_list")


def test_a_limit_the_kernel_refuses_raises_with_its_path(manager: CgroupManager) -> None:
    with pytest.raises(IsolationFailed) as failed:
        manager.tenant("tn_bad", limits(), cpus=(4095,))
    # EINVAL or ERANGE (past the kernel's CPU count), by kernel version.
    assert failed.value.errno_name in ("EINVAL", "ERANGE") and failed.value.path is not None
    assert failed.value.path.endswith("cpuset.cpus")
    assert isinstance(failed.value.__cause__, OSError)


def test_pinning_without_a_cpuset_controller_is_refused_not_ignored(support: CgroupSupport) -> None:
    without = dataclasses.replace(support, controllers=support.controllers - {"cpuset"})
    manager = CgroupManager(without, prefix=f"patinox-test-{secrets.token_hex(4)}")
    try:
        with pytest.raises(IsolationUnavailable) as refused:
            manager.tenant("tn_a", limits(), cpus=(0,))
        assert refused.value.mechanism == "cgroup cpuset controller"
    finally:
        manager.remove_all()


def test_names_that_are_not_plain_are_refused(manager: CgroupManager, support: CgroupSupport) -> None:
    for bad in ("", "..", "a/b", "cgroup.procs", "-x"):
        with pytest.raises(ConfigurationError):
            manager.tenant(bad, limits())
    with pytest.raises(ConfigurationError):
        CgroupManager(support, prefix="/abs")
    with pytest.raises(ConfigurationError):
        CgroupManager(support, prefix="../up")


# --- processes, kill, cleanup ------------------------------------------------------------


def test_kill_and_remove_leave_no_process_and_no_group(
    support: CgroupSupport, manager: CgroupManager
) -> None:
    tenant = manager.tenant("tn_gone", limits())
    procs = []
    try:
        for name in ("w0", "w1"):
            proc = gated("import time\ntime.sleep(600)")
            procs.append(proc)
            tenant.child(name).attach(proc.pid)
        assert tenant.child("w0").pids() == [procs[0].pid]
        assert tenant.pids() == sorted(p.pid for p in procs)
        assert [c.name for c in tenant.children()] == ["w0", "w1"]
        tenant.child("w0").kill()
        assert procs[0].wait(timeout=60) == -9 and procs[1].poll() is None
        manager.remove_tenant("tn_gone")
        assert procs[1].wait(timeout=60) == -9
    finally:
        for proc in procs:
            reap(proc)
    assert manager.tenants() == []
    for controller in CONTROLLERS:
        assert not group_file(support, controller, manager, "tn_gone").exists()
    manager.remove_tenant("tn_gone")  # already gone: fine


def test_a_process_placed_by_itself_then_dropped_to_nobody_cannot_write_cgroup_files(
    support: CgroupSupport, manager: CgroupManager
) -> None:
    tenant = manager.tenant("tn_drop", limits(exec_memory_bytes=64 * MiB))
    worker = tenant.child("w0")
    limit_name = "memory.limit_in_bytes" if support.version == "v1" else "memory.max"
    targets = [
        group_file(support, "memory", manager, "tn_drop", limit_name),
        group_file(support, "pids", manager, "tn_drop", "pids.max"),
        *worker.procs_files(),
        *(h.mount / "cgroup.procs" for h in support.hierarchies),  # moving out to the root
    ]

    def enter() -> None:  # what H1's freshly forked execution process does, still root
        for path in worker.procs_files():
            path.write_text(str(os.getpid()))

    def attempt() -> dict[str, object]:
        refused = {}
        for path in targets:
            try:
                path.write_text(str(os.getpid()) if path.name == "cgroup.procs" else "max")
                refused[str(path)] = False
            except PermissionError:
                refused[str(path)] = True
        return {"refused": refused, "cgroup": Path("/proc/self/cgroup").read_text()}

    seen = as_user(NOBODY, NOBODY, attempt, before=enter)
    assert all(seen["refused"].values()), seen["refused"]
    assert f"/{manager.prefix}/tn_drop/w0" in seen["cgroup"]
    assert int(group_file(support, "memory", manager, "tn_drop", limit_name).read_text()) == 64 * MiB


def test_v2_groups_account_cpu_and_kill(support: CgroupSupport) -> None:
    """The cgroup v2 path on this host's unified hierarchy (hybrid hosts keep one beside the
    v1 controllers; on a pure v2 host it is the one every other test used)."""
    v2 = next((h for h in support.hierarchies if h.version == "v2"), None)
    assert v2 is not None, "no cgroup2 mount: mount -t cgroup2 none /sys/fs/cgroup/unified"
    unified = detect_cgroups(v2.mount)
    assert unified.version == "v2" and unified.enforces("cpuacct")
    manager = CgroupManager(unified, prefix=f"patinox-test-{secrets.token_hex(4)}")
    try:
        tenant = manager.tenant("tn_v2", limits())
        worker = tenant.child("w0")
        proc, _, err = start_in(
            tenant, "w0", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
        )
        assert proc.returncode == 0, err
        assert worker.cpu_seconds() >= 0.25  # 0.3 s spun after it entered the group
        sleeper = gated("import time\ntime.sleep(600)")
        try:
            worker.attach(sleeper.pid)
            assert worker.pids() == [sleeper.pid]
            worker.kill()
            assert sleeper.wait(timeout=60) == -9
        finally:
            reap(sleeper)
    finally:
        manager.remove_all()
    assert not (v2.mount / manager.prefix).exists()


# --- rlimits ----------------------------------------------------------------------------


def test_rlimits_cover_what_cgroups_do_not(support: CgroupSupport) -> None:

    plan = limits(exec_memory_bytes=64 * MiB, max_open_files=64)
    with_cgroups = dict((r, (s, h)) for r, s, h in rlimits_for(plan, support))
    assert with_cgroups == {resource.RLIMIT_NOFILE: (64, 64), resource.RLIMIT_CORE: (0, 0)}
    bare = dataclasses.replace(support, controllers=frozenset())
    without = dict((r, (s, h)) for r, s, h in rlimits_for(plan, bare))
    assert without[resource.RLIMIT_AS] == (64 * MiB, 64 * MiB)
    assert without[resource.RLIMIT_NPROC] == (plan.max_processes, plan.max_processes)

    # The limits bind a fresh process that sets them (as the execution process does).
    script = f"""
import json, resource
for res, soft, hard in {rlimits_for(plan, bare)!r}:
    resource.setrlimit(res, (soft, hard))
seen = {{}}
try:
    seen["allocated"] = len(b"x" * (200 * 2**20)) > 0
except MemoryError:
    seen["allocated"] = False
files = []
try:
    for _ in range(100):
        files.append(open("/dev/null"))
    seen["opened_100"] = True
except OSError:
    seen["opened_100"] = False
print(json.dumps(seen))
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"allocated": False, "opened_100": False}


def test_mountinfo_parsing_knows_co_mounted_controllers_and_escapes() -> None:
    """Layouts of other hosts than this one: Debian's co-mounted ``cpu,cpuacct``, a pure
    v2 host, a mount point with a space (escaped as ``\\040``), mounts outside the root."""
    from patinox.isolation.cgroup_support import _cgroup_mounts

    mountinfo = "\n".join(
        [
            "30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755",
            "33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct",
            "34 30 0:30 / /sys/fs/cgroup/name\\040d rw - cgroup cgroup rw,name=systemd",
            "35 30 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
            "36 30 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
            "37 23 0:32 / /elsewhere/pids rw - cgroup cgroup rw,pids",
            "38 30 0:33 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate",
        ]
    )
    found = list(_cgroup_mounts(mountinfo, Path("/sys/fs/cgroup")))
    assert found == [
        ("v1", Path("/sys/fs/cgroup/cpu,cpuacct"), frozenset({"cpu", "cpuacct"})),
        ("v1", Path("/sys/fs/cgroup/name d"), frozenset()),
        ("v1", Path("/sys/fs/cgroup/memory"), frozenset({"memory"})),
        ("v2", Path("/sys/fs/cgroup/unified"), frozenset()),
    ]
    pure_v2 = "40 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot"
    assert list(_cgroup_mounts(pure_v2, Path("/sys/fs/cgroup"))) == [
        ("v2", Path("/sys/fs/cgroup"), frozenset())
    ]
