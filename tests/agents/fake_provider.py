"""A local fake of OpenAI's HTTP API for BYOK tests: a real HTTP server on a loopback
port that records the ``Authorization`` header of every request and answers the
Responses API (``POST /v1/responses``, what pydantic-ai's ``openai:`` models call) and
chat completions (``POST /v1/chat/completions``), or ``500`` while ``failing`` is set, or
``401`` quoting the key it was sent (as a real provider's "incorrect API key" answer does)
while ``rejecting`` is set."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeProvider:
    """The server's state: the ``Authorization`` header of each request, in order."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self.failing = False
        self.rejecting = False
        self.url = ""
        self._lock = threading.Lock()

    def seen(self, authorization: str) -> None:
        with self._lock:
            self.authorizations.append(authorization)


def _answer(path: str, body: dict[str, Any]) -> dict[str, Any]:
    model = str(body.get("model", "gpt-x"))
    text = "fake provider reply"
    if path.endswith("/responses"):
        return {
            "id": "resp_fake",
            "object": "response",
            "created_at": 1_700_000_000,
            "model": model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": "msg_fake",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": {
                "input_tokens": 11,
                "output_tokens": 3,
                "total_tokens": 14,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }


@contextmanager
def fake_provider() -> Iterator[FakeProvider]:
    """Run the server for the ``with`` block; ``.url`` is its base URL (``.../v1``)."""
    state = FakeProvider()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.seen(self.headers.get("Authorization", ""))
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if state.rejecting:
                quoted = self.headers.get("Authorization", "").removeprefix("Bearer ")
                message = f"Incorrect API key provided: {quoted}"
                payload = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
                self._send(401, payload.encode())
                return
            if state.failing:
                payload = json.dumps({"error": {"message": "upstream exploded", "type": "server_error"}})
                self._send(500, payload.encode())
                return
            self._send(200, json.dumps(_answer(self.path, body)).encode())

        def _send(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test reads ``authorizations`` instead."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
