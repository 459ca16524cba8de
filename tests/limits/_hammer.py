"""Worker of the multi-process admission test (a module, so ``spawn`` can import it)."""

from __future__ import annotations

import threading
from typing import Any

from patinox.errors import RateLimited
from patinox.limits import WindowRateLimiter


def hammer(
    storage_uri: str,
    key_prefix: str,
    tenant_id: str,
    limit: int,
    threads: int,
    attempts_per_thread: int,
    start: Any,
    results: Any,
) -> None:
    """Hit one tenant's limit from ``threads`` threads once every party reached ``start``.

    Puts ``(admitted, refused)`` for this process on ``results``. ``start`` is a
    multiprocessing barrier counting every thread of every process, so all hits begin together.
    """
    limiter = WindowRateLimiter(storage_uri, key_prefix=key_prefix)
    counts = {"admitted": 0, "refused": 0}
    lock = threading.Lock()

    def run() -> None:
        start.wait(timeout=60)
        admitted = refused = 0
        for _ in range(attempts_per_thread):
            try:
                limiter.hit("tenant", limit, tenant_id=tenant_id)
                admitted += 1
            except RateLimited:
                refused += 1
        with lock:
            counts["admitted"] += admitted
            counts["refused"] += refused

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    limiter.close()
    results.put((counts["admitted"], counts["refused"]))
