"""Shared by the benchmarks: free ports, starting servers as processes, checked HTTP calls."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

console = Console()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until ``url``/healthz answers 200; exit if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with code {proc.returncode} during start-up")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url}: no answer on /healthz within {timeout_s:.0f} s")


@contextmanager
def server(
    argv: list[str], url: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process, wait until healthy, stop it (SIGTERM, then kill) at exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            try:
                wait_healthy(url, proc)
            except SystemExit:
                out.flush()
                console.print(log.read_text(errors="replace")[-4000:])
                raise
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def check(r: httpx.Response, what: str) -> dict[str, Any]:
    """The JSON body of a 2xx answer; exit with the answer otherwise."""
    if r.status_code >= 300:
        raise SystemExit(f"{what} failed: {r.status_code} {r.text[:500]}")
    body: dict[str, Any] = r.json()
    return body
