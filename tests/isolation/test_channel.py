"""The tenant context crosses into an execution process as data, and the process holds the
host to it: bound to one tenant by the host's first message, it refuses (and exits on) any
later message without a ``tenant_id`` or for another tenant.

These tests are the host, talking raw frames to a real process forked by the template.
"""

from __future__ import annotations

import struct

import pytest
from pydantic_ai.messages import ModelResponse, TextPart
from pydantic_ai.usage import RequestUsage

from patinox.errors import InvalidRequest, TenantNotFound
from patinox.isolation._worker_main import EXIT_REFUSED
from patinox.isolation.channel import (
    MAX_FRAME_BYTES,
    ChannelClosed,
    Done,
    ErrorData,
    ModelReply,
    ModelRequest,
    ProtocolError,
    Ready,
    Refused,
    decode_host_message,
    encode,
)
from patinox.isolation.template import Template
from tests.isolation._raw import bind, raw_process, run_for

A, B = "tn_aaaaaaaaaaaaaaaaaaaaaaaaaa", "tn_bbbbbbbbbbbbbbbbbbbbbbbbbb"
NOBODY = {"uid": 65534, "gid": 65534}


def _reply(tenant_id: str, text: str = "[simulated] hi") -> bytes:
    """A ModelReply frame's body, as the host sends it."""
    response = ModelResponse(parts=[TextPart(text)], usage=RequestUsage(input_tokens=3, output_tokens=2))
    return encode(ModelReply(tenant_id=tenant_id, response=response))[4:]


def _refused_then_exits(proc: object) -> str:
    from tests.isolation._raw import RawProcess

    assert isinstance(proc, RawProcess)
    refused = proc.receive()
    assert isinstance(refused, Refused), refused
    with pytest.raises(ChannelClosed):
        proc.receive()
    assert proc.exit_status() == EXIT_REFUSED
    return refused.reason


def test_a_bound_process_runs_its_tenants_run_and_refuses_another_tenants(exec_template: Template) -> None:
    with raw_process(exec_template) as proc:
        proc.send_json(bind(A, **NOBODY))
        ready = proc.receive()
        assert isinstance(ready, Ready) and ready.uid == 65534
        proc.send_json(run_for(A))
        request = proc.receive()
        assert isinstance(request, ModelRequest)  # the host makes the model request
        proc.send_bytes(_reply(A))
        done = proc.receive()
        assert isinstance(done, Done) and done.output == "[simulated] hi"
        # The same process, now asked to run for another tenant.
        proc.send_json(run_for(B))
        assert "another tenant" in _refused_then_exits(proc)


def test_a_message_without_tenant_id_is_refused(exec_template: Template) -> None:
    with raw_process(exec_template) as proc:
        proc.send_json(bind(A, **NOBODY))
        assert isinstance(proc.receive(), Ready)
        proc.send_json(run_for(None))
        assert "tenant_id" in _refused_then_exits(proc)


def test_a_model_reply_for_another_tenant_is_refused_mid_run(exec_template: Template) -> None:
    with raw_process(exec_template) as proc:
        proc.send_json(bind(A, **NOBODY))
        assert isinstance(proc.receive(), Ready)
        proc.send_json(run_for(A))
        assert isinstance(proc.receive(), ModelRequest)
        proc.send_bytes(_reply(B))
        assert "another tenant" in _refused_then_exits(proc)


def test_the_first_message_must_bind_the_process(exec_template: Template) -> None:
    with raw_process(exec_template) as proc:
        proc.send_json(run_for(A))
        assert "bind" in _refused_then_exits(proc)


def test_a_bind_without_tenant_id_is_refused(exec_template: Template) -> None:
    with raw_process(exec_template) as proc:
        proc.send_json({"type": "bind", **NOBODY})
        assert "tenant_id" in _refused_then_exits(proc)


def test_a_second_bind_is_refused(exec_template: Template) -> None:
    with raw_process(exec_template) as proc:
        proc.send_json(bind(A, **NOBODY))
        assert isinstance(proc.receive(), Ready)
        proc.send_json(bind(A, **NOBODY))
        assert "expected a run" in _refused_then_exits(proc)


def test_a_frame_over_the_limit_is_refused_before_it_is_read(exec_template: Template) -> None:
    with raw_process(exec_template) as proc:
        proc.send_json(bind(A, **NOBODY))
        assert isinstance(proc.receive(), Ready)
        proc.sock.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1))
        assert "over" in _refused_then_exits(proc)


def test_messages_are_typed_data_both_ways() -> None:
    frame = encode(ModelReply(tenant_id=A, error=ErrorData.of(InvalidRequest("bad key", field="key"))))
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    message = decode_host_message(frame[4:])
    assert isinstance(message, ModelReply) and message.error is not None
    err = message.error.to_error()
    assert type(err) is InvalidRequest and err.message == "bad key" and err.fields == {"field": "key"}
    # Every error of the tree comes back as its own class, by code.
    assert type(ErrorData.of(TenantNotFound("gone")).to_error()).__name__ == "NotFound"
    with pytest.raises(ProtocolError):
        decode_host_message(b'{"type": "run"}')
