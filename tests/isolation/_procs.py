"""Real processes for the isolation tests: held at a gate until the test has placed them,
and forks that drop to another uid (the way an execution process does) to try something."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

#: Guard against a hang, never an assertion: generous on a loaded 2-core machine.
HANG_GUARD_S = 120


def gated(code: str) -> subprocess.Popen[str]:
    """``python -c code`` that starts once :func:`release` is called (after the test moved
    it into a cgroup); its stdout is captured."""
    return subprocess.Popen(
        [sys.executable, "-I", "-c", f"import sys\nsys.stdin.readline()\n{code}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def release(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Open the gate and wait for the process; (stdout, stderr)."""
    return proc.communicate("go\n", timeout=HANG_GUARD_S)


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill the process if it still runs, wait for it and close its pipes."""
    proc.kill()
    proc.wait(timeout=HANG_GUARD_S)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def as_user(
    uid: int, gid: int, attempt: Callable[[], Any], *, before: Callable[[], None] | None = None
) -> Any:
    """Fork; in the child run ``before`` (still root), drop to ``uid:gid`` with no
    supplementary groups, run ``attempt`` and send back its (JSON) result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        code = 0
        try:
            if before is not None:
                before()
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            payload = {"ok": attempt()}
        except BaseException:
            payload = {"error": traceback.format_exc()}
            code = 1
        os.write(write_end, json.dumps(payload).encode())
        os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as reader:
        while chunk := reader.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks))
    assert "error" not in result, result["error"]
    return result["ok"]
