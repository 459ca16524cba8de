"""The tenants' writable directories (real tmpfs mounts) and execution identities.

A tenant's directory holds what its size says and not a byte more (``ENOSPC`` for the
tenant, ``full()`` for the host), belongs to the tenant's uid alone, grows and shrinks with
its plan, and disappears with it. Runs as root (CI and the development machine).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from patinox.errors import ConfigurationError, IsolationFailed, IsolationUnavailable
from patinox.isolation.workdir import ExecIdentities, Workdirs, probe_tmpfs
from tests.isolation._procs import as_user

MiB = 2**20
NOBODY = 65534
UID_A, UID_B = 100_001, 100_002


def mounted(path: Path) -> dict[str, str] | None:
    """Mount options of ``path`` from /proc/self/mountinfo (per-mount and tmpfs options)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if fields[4] == str(path):
            fstype, _, superopts = right.split()[:3]
            opts = {
                o.partition("=")[0]: o.partition("=")[2] for o in (fields[5] + "," + superopts).split(",")
            }
            return {"fstype": fstype, **opts}
    return None


@pytest.fixture
def workdirs() -> Iterator[Workdirs]:
    root = Path(tempfile.mkdtemp(prefix="patinox-test-"))
    root.chmod(0o711)  # the tenants' uids pass through to their own directory
    dirs = Workdirs(root / "exec")
    yield dirs
    for tenant in os.listdir(dirs.root):
        dirs.remove(tenant)
    assert not any(mounted(dirs.root / t) for t in ("tn_a", "tn_b"))
    shutil.rmtree(root)


def fill(path: Path) -> dict[str, object]:
    """Write 1 MiB chunks into ``path`` until the file system says no."""
    written = 0
    try:
        with open(path / "fill.bin", "wb") as out:
            while written < 1024 * MiB:
                out.write(b"\0" * MiB)
                out.flush()
                written += MiB
    except OSError as err:
        return {"errno": errno.errorcode[err.errno or 0], "written": written}
    return {"errno": None, "written": written}


def test_a_tenant_directory_is_a_private_size_capped_tmpfs(workdirs: Workdirs) -> None:
    workdir = workdirs.ensure("tn_a", uid=UID_A, gid=UID_A, size_bytes=4 * MiB)
    assert workdir.path == workdirs.root / "tn_a" and workdir.size_bytes == 4 * MiB
    options = mounted(workdir.path)
    assert options is not None and options["fstype"] == "tmpfs"
    assert {"nosuid", "nodev"} <= options.keys() and options["size"] == "4096k"
    info = workdir.path.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (UID_A, UID_A, 0o700)
    assert workdirs.root.stat().st_mode & 0o777 == 0o711
    assert workdirs.ensure("tn_a", uid=UID_A, gid=UID_A, size_bytes=4 * MiB) == workdir  # idempotent


def test_writing_past_the_cap_fails_with_enospc_and_full_says_so(workdirs: Workdirs) -> None:
    workdir = workdirs.ensure("tn_a", uid=UID_A, gid=UID_A, size_bytes=4 * MiB)
    assert not workdirs.full("tn_a") and workdirs.used_bytes("tn_a") == 0
    seen = as_user(UID_A, UID_A, lambda: fill(workdir.path))
    assert seen["errno"] == "ENOSPC" and seen["written"] <= 4 * MiB
    assert workdirs.full("tn_a")
    assert workdirs.used_bytes("tn_a") == 4 * MiB


def test_resize_keeps_the_files_and_moves_the_cap(workdirs: Workdirs) -> None:
    workdir = workdirs.ensure("tn_a", uid=UID_A, gid=UID_A, size_bytes=2 * MiB)
    as_user(UID_A, UID_A, lambda: fill(workdir.path))
    assert workdirs.full("tn_a")
    bigger = workdirs.ensure("tn_a", uid=UID_A, gid=UID_A, size_bytes=8 * MiB)
    assert bigger.size_bytes == 8 * MiB and mounted(workdir.path) is not None
    assert (workdir.path / "fill.bin").stat().st_size == 2 * MiB  # the remount kept them
    assert not workdirs.full("tn_a")
    more = as_user(UID_A, UID_A, lambda: fill(workdir.path))  # rewrites fill.bin up to the cap
    assert more["errno"] == "ENOSPC" and 2 * MiB < int(more["written"]) <= 8 * MiB
    with pytest.raises(IsolationFailed) as refused:  # below what it holds: refused, not lost
        workdirs.ensure("tn_a", uid=UID_A, gid=UID_A, size_bytes=2 * MiB)
    assert refused.value.errno_name == "EINVAL"
    assert mounted(workdir.path) is not None and mounted(workdir.path)["size"] == "8192k"  # type: ignore[index]


def test_another_tenant_uid_cannot_enter_or_list(workdirs: Workdirs) -> None:
    a = workdirs.ensure("tn_a", uid=UID_A, gid=UID_A, size_bytes=MiB)
    workdirs.ensure("tn_b", uid=UID_B, gid=UID_B, size_bytes=MiB)
    (a.path / "secret.txt").write_text("tenant a")
    os.chown(a.path / "secret.txt", UID_A, UID_A)

    def peek() -> dict[str, str]:
        seen = {}
        for what, call in (
            ("list other", lambda: os.listdir(a.path)),
            ("read other", lambda: (a.path / "secret.txt").read_text()),
            ("list root", lambda: os.listdir(workdirs.root)),
        ):
            try:
                call()
                seen[what] = "allowed"
            except PermissionError:
                seen[what] = "refused"
        seen["own"] = str(len(os.listdir(workdirs.root / "tn_b")))
        return seen

    assert as_user(UID_B, UID_B, peek) == {
        "list other": "refused",
        "read other": "refused",
        "list root": "refused",
        "own": "0",
    }


def test_remove_unmounts_and_deletes(workdirs: Workdirs) -> None:
    workdir = workdirs.ensure("tn_a", uid=UID_A, gid=UID_A, size_bytes=MiB)
    (workdir.path / "x").write_bytes(b"x" * 1000)
    with open(workdir.path / "x", "rb"):  # an open file keeps it busy: detached, not stuck
        workdirs.remove("tn_a")
    assert mounted(workdir.path) is None and not workdir.path.exists()
    workdirs.remove("tn_a")  # gone already: fine
    assert workdirs.used_bytes("tn_a") == 0 and not workdirs.full("tn_a")


def test_names_that_are_not_plain_are_refused(workdirs: Workdirs) -> None:
    for bad in ("", "..", "a/b", "../etc"):
        with pytest.raises(ConfigurationError):
            workdirs.ensure(bad, uid=UID_A, gid=UID_A, size_bytes=MiB)


def test_without_mount_permission_it_is_a_plain_directory_and_says_so() -> None:
    root = Path(tempfile.mkdtemp(prefix="patinox-test-"))
    os.chown(root, NOBODY, NOBODY)
    try:

        def attempt() -> dict[str, object]:
            dirs = Workdirs(root / "exec")
            workdir = dirs.ensure("tn_a", uid=NOBODY, gid=NOBODY, size_bytes=MiB)
            (workdir.path / "f").write_bytes(b"x" * 8192)
            return {
                "size": workdir.size_bytes,
                "mode": workdir.path.stat().st_mode & 0o777,
                "used": dirs.used_bytes("tn_a"),
                "probe": probe_tmpfs()[0],
            }

        seen = as_user(NOBODY, NOBODY, attempt)
        assert seen == {"size": None, "mode": 0o700, "used": seen["used"], "probe": False}
        assert int(seen["used"]) >= 8192  # type: ignore[call-overload]
        assert mounted(root / "exec" / "tn_a") is None
    finally:
        shutil.rmtree(root)


def test_probe_tmpfs_as_root() -> None:
    ok, detail = probe_tmpfs()
    assert ok, detail


# --- execution identities -----------------------------------------------------------------


def test_each_tenant_gets_its_own_stable_ids() -> None:
    ids = ExecIdentities(base=200_000, count=10)
    a, b = ids.for_tenant("tn_a"), ids.for_tenant("tn_b")
    assert a == (200_000, 200_000) and b == (200_001, 200_001)
    assert ids.for_tenant("tn_a") == a


def test_ids_of_system_accounts_are_skipped_and_the_range_runs_out() -> None:
    ids = ExecIdentities(base=NOBODY, count=2)  # 65534 is nobody's
    first = ids.for_tenant("tn_a")
    assert first[0] != NOBODY
    with pytest.raises(IsolationUnavailable) as refused:
        ids.for_tenant("tn_b")
    assert refused.value.mechanism == "execution uids"
    with pytest.raises(ConfigurationError):
        ExecIdentities(base=0)


def test_a_registry_keeps_ids_across_processes(tmp_path: Path) -> None:
    registry = tmp_path / "patinox-test-ids.json"
    here = ExecIdentities(base=300_000, count=100, registry=registry)
    assert here.for_tenant("tn_a") == (300_000, 300_000)
    # Another process (a restart, or the other executing process on the host).
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from patinox.isolation.workdir import ExecIdentities\n"
        f"ids = ExecIdentities(base=300_000, count=100, registry=Path({str(registry)!r}))\n"
        "print(json.dumps([ids.for_tenant('tn_b'), ids.for_tenant('tn_a')]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[300_001, 300_001], [300_000, 300_000]]
    assert here.for_tenant("tn_b") != here.for_tenant("tn_a")
    assert json.loads(registry.read_text()) == {"tn_a": 300_000, "tn_b": 300_001}
