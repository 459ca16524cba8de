"""The ``python`` tool's runner: model-written code in a fresh child process, per call.

:func:`run_code` starts ``[sys.executable, "-I", "-c", code]``: never the calling process
(which runs the agent loop and holds the run's channel), always a new interpreter, in its
own process group, with stdin ``/dev/null``, a minimal environment and every other file
descriptor closed. ``-I`` keeps the working directory, ``PYTHON*`` variables and the user
site off its path; installed packages (the virtual environment's) stay importable.

It is meant to run inside the tenant's sandbox (:mod:`patinox.isolation.sandbox`; the
execution process calling it is already in there, so the child inherits the sandbox, the
tenant's uid, cgroup and rlimits); it works the same outside, for tests.

Bounds of one call:

- wall time ``timeout_s``: then the whole process group is killed (``SIGKILL``) and the
  result says ``timed_out``;
- output ``output_bytes``: the first ``output_bytes`` bytes of stdout and stderr together
  (in the order they arrive) are kept, the rest is read and thrown away, so a flood can
  neither fill memory nor block the child on a full pipe; the result says ``truncated``;
- what the code leaves behind in its process group when it exits is killed too.

:class:`CodeRunner` binds those limits and the working directory once, for a run's
:class:`~patinox.agents.tools.ToolDeps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from patinox.agents.tools import CodeResult
from patinox.errors import ConfigurationError
from patinox.tenancy import ResourceLimits

__all__ = ["CodeResult", "CodeRunner", "run_code"]

_CHUNK: Final = 65_536
_EXIT_GRACE_S: Final = 1.0
"""After the code's process exits, how long its pipes may stay open (held by something it
started outside its process group) before they are closed, seconds."""
_NO_SPACE: Final = ("No space left on device", "[Errno 28]", "ENOSPC")


def _env(cwd: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(cwd),
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
    }


class _Output:
    """stdout and stderr of one call, kept up to a shared cap."""

    def __init__(self, cap: int) -> None:
        self.room = cap
        self.kept: dict[int, bytearray] = {}
        self.truncated = False

    def add(self, fd: int, data: bytes) -> None:
        keep = data[: self.room]
        self.kept.setdefault(fd, bytearray()).extend(keep)
        self.room -= len(keep)
        if len(keep) < len(data):
            self.truncated = True

    def text(self, fd: int) -> str:
        return bytes(self.kept.get(fd, b"")).decode("utf-8", "replace")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _disk_full(cwd: Path, stderr: str) -> bool:
    if any(marker in stderr for marker in _NO_SPACE):
        return True
    try:
        stats = os.statvfs(cwd)
    except OSError:
        return False
    return stats.f_blocks > 0 and stats.f_bavail == 0


def _pump(process: subprocess.Popen[bytes], output: _Output, deadline: float, cancel: int | None) -> bool:
    """Read both pipes until they close and the process has exited; ``True`` when the
    deadline or ``cancel`` came before the process exited (it timed out).

    The process's exit is watched through a pidfd: once it has exited, its group is killed
    and the pipes get :data:`_EXIT_GRACE_S` more (something it started outside its group may
    hold them), after which they are left.
    """
    assert process.stdout is not None and process.stderr is not None
    pidfd = os.pidfd_open(process.pid)
    open_fds = {process.stdout.fileno(), process.stderr.fileno()}
    exited = False
    with selectors.DefaultSelector() as selector:
        for fd in open_fds:
            selector.register(fd, selectors.EVENT_READ)
        selector.register(pidfd, selectors.EVENT_READ)
        if cancel is not None:
            selector.register(cancel, selectors.EVENT_READ)
        try:
            while open_fds or not exited:  # a program may close its output and go on
                left = deadline - time.monotonic()
                if left <= 0:
                    return not exited
                for key, _ in selector.select(left):
                    fd = int(key.fd)
                    if fd == cancel:
                        return not exited
                    if fd == pidfd:
                        exited = True
                        selector.unregister(pidfd)
                        _kill_group(process.pid)
                        deadline = min(deadline, time.monotonic() + _EXIT_GRACE_S)
                        continue
                    data = os.read(fd, _CHUNK)
                    if data:
                        output.add(fd, data)
                    else:
                        selector.unregister(fd)
                        open_fds.discard(fd)
            return False
        finally:
            os.close(pidfd)


def run_code(
    code: str, *, timeout_s: float, output_bytes: int, cwd: Path, cancel: int | None = None
) -> CodeResult:
    """Run Python ``code`` once in a fresh child process and wait for it (module docstring).

    Args:
        code: the program text, run as ``python -I -c code``.
        timeout_s: wall time allowed, seconds (> 0); then the process group is killed.
        output_bytes: most bytes of stdout and stderr together kept (>= 1).
        cwd: the child's working directory (``/work`` in a sandbox), also its ``HOME``.
        cancel: a file descriptor that becomes readable to stop the call early (the child's
            group is killed and the result says ``timed_out``); ``None`` for none.

    Returns:
        What the code printed (UTF-8, undecodable bytes replaced), its exit status (``-N``
        when killed by signal N, so ``-9`` after a timeout), whether it timed out, whether
        output was dropped, and whether ``cwd``'s file system is full after the call or the
        code failed with ``ENOSPC`` (``disk_full``).

    Raises:
        ConfigurationError: ``timeout_s`` or ``output_bytes`` out of range, or ``code``
            holds a NUL character.
        OSError: the child could not be started (no interpreter, ``cwd`` missing).
    """
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ConfigurationError(f"timeout_s must be a finite number > 0 seconds, got {timeout_s!r}")
    if isinstance(output_bytes, bool) or not isinstance(output_bytes, int) or output_bytes < 1:
        raise ConfigurationError(f"output_bytes must be an integer >= 1, got {output_bytes!r}")
    if "\0" in code:
        raise ConfigurationError("code holds a NUL character, which no program text can")
    deadline = time.monotonic() + timeout_s
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", code],
        cwd=cwd,
        env=_env(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=True,
        process_group=0,
    )
    assert process.stdout is not None and process.stderr is not None
    stdout_fd, stderr_fd = process.stdout.fileno(), process.stderr.fileno()
    output = _Output(output_bytes)
    try:
        stopped = _pump(process, output, deadline, cancel)
    finally:
        _kill_group(process.pid)
        status = process.wait()
        process.stdout.close()
        process.stderr.close()
    stderr = output.text(stderr_fd)
    return CodeResult(
        stdout=output.text(stdout_fd),
        stderr=stderr,
        exit_status=status,
        timed_out=stopped,
        truncated=output.truncated,
        disk_full=_disk_full(cwd, stderr),
    )


class CodeRunner:
    """Runs ``python`` tool calls of one tenant under its limits, in one working directory:
    the :class:`~patinox.agents.tools.CodeRunner` a run's ``ToolDeps`` holds.

    Each call goes to :func:`run_code` in a worker thread, so the event loop (the run's
    other work, its channel) keeps going; a run cancelled meanwhile (its timeout, a
    cancellation) kills the code's process group before the cancellation goes on, so no
    code outlives its run.

    Args:
        timeout_s: wall time of one call, seconds (the tenant's ``code_timeout_s``).
        output_bytes: output kept from one call, bytes (``code_output_bytes``).
        cwd: the working directory (``/work`` inside the sandbox).
    """

    def __init__(self, *, timeout_s: float, output_bytes: int, cwd: Path) -> None:
        self.timeout_s = timeout_s
        self.output_bytes = output_bytes
        self.cwd = cwd

    @classmethod
    def for_limits(cls, limits: ResourceLimits, cwd: Path) -> CodeRunner:
        """A runner with the tenant's ``code_timeout_s`` and ``code_output_bytes``."""
        return cls(timeout_s=limits.code_timeout_s, output_bytes=limits.code_output_bytes, cwd=cwd)

    async def run(self, code: str) -> CodeResult:
        """Run ``code`` once (see :func:`run_code`).

        Raises:
            ConfigurationError: as :func:`run_code`.
            OSError: the child could not be started.
        """
        stop_read, stop_write = os.pipe()

        def call() -> CodeResult:
            try:
                return run_code(
                    code,
                    timeout_s=self.timeout_s,
                    output_bytes=self.output_bytes,
                    cwd=self.cwd,
                    cancel=stop_read,
                )
            finally:
                os.close(stop_read)

        task = asyncio.ensure_future(asyncio.to_thread(call))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            os.write(stop_write, b"x")  # the thread kills the group and returns promptly
            await asyncio.wait({task})
            raise
        finally:
            # After the thread is done; or, if this wait is cancelled again, the end of the
            # pipe stops the call all the same.
            os.close(stop_write)
