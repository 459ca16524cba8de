"""Stops the servers a test run started for itself when the run ends without stopping them.

Run as ``python tests/_watchdog.py ROOT`` with a pipe from the test run as standard input,
in a session of its own (a Ctrl-C at the terminal does not reach it). The run writes one
line ``PID SIGNAL`` per server it starts and ``stopped`` once it has stopped them itself.
The pipe closes when the run's process ends, however it ends (a finished run, Ctrl-C,
``kill -9``); then every server not reported stopped is sent its signal (killed if still
running 10 s later) and the directory ROOT the servers lived in is removed.

Standard library only: it must not depend on what the run had imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run as another user (PostgreSQL started by root)
        return True
    return True


def main(root: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    servers: dict[int, int] = {}
    for line in sys.stdin:
        words = line.split()
        if words == ["stopped"]:
            servers.clear()
        elif len(words) == 2:
            servers[int(words[0])] = int(words[1])
    for pid, sig in servers.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in servers:
        if _running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
