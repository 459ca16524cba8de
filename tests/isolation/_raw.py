"""A raw execution process for tests: forked by the run's template, its channel held by
the test, which sends hand-made frames (no pool, no executor in between)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from patinox.isolation.channel import ChannelClosed, decode_process_message
from patinox.isolation.template import Template

#: A guard against a hang, never a measure (seconds).
GUARD_S = 60.0


class RawProcess:
    """One execution process and the test's end of its channel."""

    def __init__(self, template: Template) -> None:
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.pid, self.exit = template.spawn(child)
        finally:
            child.close()
        self.sock.settimeout(GUARD_S)
        self._template = template
        self._buf = b""

    def send_json(self, body: dict[str, Any]) -> None:
        self.send_bytes(json.dumps(body).encode())

    def send_bytes(self, body: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def receive(self) -> Any:
        """The process's next message (decoded); raises ChannelClosed at end of file."""
        while True:
            if len(self._buf) >= 4:
                (size,) = struct.unpack(">I", self._buf[:4])
                if len(self._buf) >= 4 + size:
                    body, self._buf = self._buf[4 : 4 + size], self._buf[4 + size :]
                    return decode_process_message(body)
            data = self.sock.recv(65536)
            if not data:
                raise ChannelClosed("closed")
            self._buf += data

    def exit_status(self) -> int:
        """The process's exit status once it ended (waits, with a guard)."""
        return self.exit.result(GUARD_S)

    def close(self) -> None:
        self.sock.close()
        self._template.kill(self.pid)
        with suppress(concurrent.futures.TimeoutError):
            self.exit.result(GUARD_S)


@contextmanager
def raw_process(template: Template) -> Iterator[RawProcess]:
    proc = RawProcess(template)
    try:
        yield proc
    finally:
        proc.close()


def bind(tenant_id: str, **extra: Any) -> dict[str, Any]:
    """A Bind message as JSON data (no identity change, no directory: the test's own)."""
    return {"type": "bind", "tenant_id": tenant_id, **extra}


def run_for(tenant_id: str | None, **extra: Any) -> dict[str, Any]:
    """A Run message as JSON data; ``tenant_id=None`` leaves the field out."""
    from patinox.tenancy import TenantContext, get_plan

    context = TenantContext(
        tenant_id=tenant_id or "tn_none",
        principal="k",
        scopes=frozenset(),
        plan="free",
        limits=get_plan("free").limits,
    )
    body: dict[str, Any] = {
        "type": "run",
        "context": context.to_wire(),
        "name": "a",
        "instructions": "be brief",
        "model": "simulated:instant",
        "tools": [],
        "model_name": "simulated",
        "model_system": "function",
        "prompt": "hello there",
        "output_tokens": 3,
        "max_output_tokens": 100,
        "max_tool_calls": 4,
        "timeout_s": 30,
        **extra,
    }
    if tenant_id is not None:
        body["tenant_id"] = tenant_id
    return body
