"""Serve an ASGI app with uvicorn on a free 127.0.0.1 port, in a thread, for one test."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def serve(app: Any, *, before_stop: Callable[[], None] | None = None, lifespan: str = "off") -> Iterator[str]:
    """Yield the base URL of ``app`` served over a real socket; stop the server after.

    ``before_stop`` runs first on the way out (e.g. to release requests the app holds, so
    the server can shut down). ``lifespan="on"`` runs the app's start-up and shut-down
    (Patinox's app starts its embedded queue worker there).
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan=lifespan,  # type: ignore[arg-type]
        ws="none",
        http="h11",
        loop="asyncio",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if before_stop is not None:
            before_stop()
        server.should_exit = True
        thread.join()
        sock.close()
