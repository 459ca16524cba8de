"""The PostgreSQL ``LISTEN`` side of the run queue: wakes idle workers when a run is queued.

:class:`~patinox.limits.FairRunQueue` sends ``NOTIFY`` on :data:`NOTIFY_CHANNEL` in the
transaction that queues or puts back a run; a :class:`QueueListener` (one per worker
process, made by :meth:`~patinox.limits.FairRunQueue.listen`) hears it on a thread of its
own. SQLite deployments have no listener: their workers poll.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import structlog

#: PostgreSQL channel notified when a run is queued or put back (no payload).
NOTIFY_CHANNEL = "patinox_run_queue"
#: Seconds a listener waits for a notification before it checks whether to stop; and
#: the first pause before it reconnects after losing its connection (doubling to 30 s).
_LISTEN_TICK_S = 1.0

log = structlog.get_logger("patinox.queue")


class QueueListener:
    """A thread holding a PostgreSQL ``LISTEN`` connection on :data:`NOTIFY_CHANNEL`; see
    :meth:`FairRunQueue.listen`.

    The connection is the engine's own kind (same URL and connect arguments), taken out of
    its pool for good and in autocommit. A lost connection is reopened after a pause
    (1 s, doubling to 30 s), and ``on_notify`` is called again once it is back, since
    notifications sent meanwhile are lost. ``on_notify`` must be cheap and thread-safe
    (``loop.call_soon_threadsafe(event.set)``).

    Attributes:
        notified: notifications received so far (a count; for tests and metrics).
        connected: set while the ``LISTEN`` connection is up.
    """

    def __init__(self, engine: Any, on_notify: Callable[[], object]) -> None:
        self._engine = engine
        self._on_notify = on_notify
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.notified = 0
        self._thread = threading.Thread(target=self._run, name="patinox-queue-listen", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening; returns within about a second (the thread is a daemon)."""
        self._stop.set()
        self._thread.join(timeout=2 * _LISTEN_TICK_S)

    def _run(self) -> None:
        pause = _LISTEN_TICK_S
        while not self._stop.is_set():
            try:
                self._listen()
                pause = _LISTEN_TICK_S
            except Exception as err:  # a lost connection: listen again after a pause
                self.connected.clear()
                log.warning("queue listener lost its connection; reconnecting", error=type(err).__name__)
                self._stop.wait(pause)
                pause = min(30.0, pause * 2)

    def _listen(self) -> None:
        raw = self._engine.raw_connection()
        raw.detach()  # this connection never goes back to the pool
        conn = raw.dbapi_connection
        try:
            conn.autocommit = True
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.connected.set()
            self._on_notify()  # runs queued before the LISTEN
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=_LISTEN_TICK_S, stop_after=1):
                    self.notified += 1
                    self._on_notify()
        finally:
            self.connected.clear()
            with contextlib.suppress(Exception):
                raw.close()
