"""run_code: a fresh child per call, its time limit, its output cap, a full disk told apart.

Run outside any sandbox here (run_code works the same inside, where the execution process
calls it); test_sandbox.py covers the sandbox itself.
"""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patinox.errors import ConfigurationError
from patinox.isolation.code import CodeRunner, run_code

GUARD_S = 60.0  # a guard against a hang, never an assertion


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not reaped by the host's init, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_runs_in_a_fresh_process_and_returns_what_it_printed(tmp_path: Path) -> None:
    code = "import os, sys\nprint(6*7)\nprint(os.getpid(), os.getppid(), os.getcwd())\nsys.exit(3)"
    result = run_code(code, timeout_s=GUARD_S, output_bytes=10_000, cwd=tmp_path)
    answer, ids = result.stdout.splitlines()
    pid, ppid, cwd = ids.split()
    assert answer == "42"
    assert int(pid) != os.getpid() and int(ppid) == os.getpid()
    assert cwd == str(tmp_path)
    assert (result.exit_status, result.timed_out, result.truncated, result.disk_full) == (
        3,
        False,
        False,
        False,
    )


def test_stderr_and_a_failing_program(tmp_path: Path) -> None:
    result = run_code("1/0", timeout_s=GUARD_S, output_bytes=10_000, cwd=tmp_path)
    assert result.exit_status == 1
    assert "ZeroDivisionError" in result.stderr
    assert result.stdout == ""


def test_isolated_mode_ignores_the_working_directory_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "json.py").write_text("raise SystemExit('shadowed')")
    monkeypatch.setenv("PATINOX_DATABASE_URL", "sqlite:////patinox-test-secret.db")
    code = "import json, os\nprint(json.dumps(sorted(os.environ)))"
    result = run_code(code, timeout_s=GUARD_S, output_bytes=10_000, cwd=tmp_path)
    assert result.exit_status == 0, result.stderr
    assert "PATINOX_DATABASE_URL" not in result.stdout
    assert "HOME" in result.stdout


def test_stdin_is_empty_and_no_other_descriptor_is_inherited(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        code = (
            "import os, sys\n"
            "print(repr(sys.stdin.read()), sorted(int(f) for f in os.listdir('/proc/self/fd')))"
        )
        result = run_code(code, timeout_s=GUARD_S, output_bytes=10_000, cwd=tmp_path)
    finally:
        os.close(read_end)
        os.close(write_end)
    stdin, fds = result.stdout.split(" ", 1)
    assert stdin == "''"
    open_fds = ast.literal_eval(fds)
    assert write_end not in open_fds
    assert open_fds[:3] == [0, 1, 2] and len(open_fds) <= 4  # and the listing's own descriptor


def test_an_endless_loop_is_killed_at_the_time_limit(tmp_path: Path) -> None:
    code = (
        "import os\nopen('pid', 'w').write(str(os.getpid()))\nprint('looping', flush=True)\nwhile True: pass"
    )
    result = run_code(code, timeout_s=1.0, output_bytes=10_000, cwd=tmp_path)
    assert result.timed_out
    assert result.exit_status == -9
    assert result.stdout == "looping\n"
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_the_whole_process_group_is_killed(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "open('child', 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
    )
    result = run_code(code, timeout_s=GUARD_S, output_bytes=10_000, cwd=tmp_path)
    assert (result.stdout, result.timed_out) == ("started\n", False)
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + GUARD_S
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child)


def test_a_flood_of_output_is_truncated_and_cannot_block(tmp_path: Path) -> None:
    code = "import sys\nsys.stdout.write('x' * 5_000_000)\nsys.stderr.write('e' * 5_000_000)\nprint('end')"
    result = run_code(code, timeout_s=GUARD_S, output_bytes=1000, cwd=tmp_path)
    assert result.truncated and not result.timed_out
    assert result.exit_status == 0
    assert len(result.stdout) + len(result.stderr) == 1000
    assert result.stdout == "x" * len(result.stdout)


def test_an_endless_flood_ends_at_the_time_limit(tmp_path: Path) -> None:
    code = "import sys\nwhile True: sys.stdout.write('y' * 65536)"
    result = run_code(code, timeout_s=1.0, output_bytes=5000, cwd=tmp_path)
    assert result.timed_out and result.truncated
    assert result.stdout == "y" * 5000


def test_output_within_the_cap_is_whole(tmp_path: Path) -> None:
    result = run_code("print('é' * 10)", timeout_s=GUARD_S, output_bytes=21, cwd=tmp_path)
    assert (result.stdout, result.truncated) == ("é" * 10 + "\n", False)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs (as the tenant's directory is), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "patinox-test-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_directory_is_reported(tiny_disk: Path) -> None:
    code = (
        "try:\n"
        "    with open('fill', 'wb') as f:\n"
        "        while True: f.write(b'z' * 4096)\n"
        "except OSError:\n"
        "    pass\n"  # the code hides the error: the file system's state still tells
    )
    result = run_code(code, timeout_s=GUARD_S, output_bytes=10_000, cwd=tiny_disk)
    assert (result.exit_status, result.stderr, result.disk_full) == (0, "", True)
    (tiny_disk / "fill").unlink()
    again = run_code("print('fine')", timeout_s=GUARD_S, output_bytes=10_000, cwd=tiny_disk)
    assert not again.disk_full


def test_no_space_left_is_reported(tmp_path: Path) -> None:
    code = "with open('/dev/full', 'w') as f:\n    f.write('x')"  # the kernel's own ENOSPC
    result = run_code(code, timeout_s=GUARD_S, output_bytes=10_000, cwd=tmp_path)
    assert result.exit_status == 1
    assert "No space left on device" in result.stderr
    assert result.disk_full


@pytest.mark.parametrize(
    ("timeout_s", "output_bytes", "code"),
    [(0, 10, "pass"), (float("inf"), 10, "pass"), (1, 0, "pass"), (1, 10, "print('\0')")],
)
def test_bad_arguments(tmp_path: Path, timeout_s: float, output_bytes: int, code: str) -> None:
    with pytest.raises(ConfigurationError):
        run_code(code, timeout_s=timeout_s, output_bytes=output_bytes, cwd=tmp_path)


async def test_cancelling_the_runner_kills_the_code(tmp_path: Path) -> None:
    runner = CodeRunner(timeout_s=GUARD_S, output_bytes=1000, cwd=tmp_path)
    code = "import os, time\nopen('pid', 'w').write(str(os.getpid()))\ntime.sleep(600)"
    task = asyncio.create_task(runner.run(code))
    pid_file = tmp_path / "pid"
    deadline = time.monotonic() + GUARD_S
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    pid = int(pid_file.read_text())
    assert _alive(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _alive(pid)  # killed before the cancellation went on


async def test_the_runner_keeps_the_event_loop_free(tmp_path: Path) -> None:
    runner = CodeRunner(timeout_s=GUARD_S, output_bytes=1000, cwd=tmp_path)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        result = await runner.run("import time; time.sleep(0.5); print('done')")
    finally:
        ticker.cancel()
    assert result.stdout == "done\n"
    assert ticks > 5


def test_closing_its_output_does_not_end_the_wait(tmp_path: Path) -> None:
    code = "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(0.3)\nopen('done', 'w').write('yes')"
    result = run_code(code, timeout_s=GUARD_S, output_bytes=1000, cwd=tmp_path)
    assert (result.exit_status, result.timed_out) == (0, False)
    assert (tmp_path / "done").read_text() == "yes"


def test_closing_its_output_and_looping_still_times_out(tmp_path: Path) -> None:
    code = "import os\nos.close(1)\nos.close(2)\nwhile True: pass"
    result = run_code(code, timeout_s=1.0, output_bytes=1000, cwd=tmp_path)
    assert (result.exit_status, result.timed_out) == (-9, True)
