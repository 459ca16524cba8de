"""Worker process of the ``limiter_excess`` measurement in ``bench/noisy_neighbour.py``.

A module of its own so that ``multiprocessing`` (spawn) can import it in each child.
"""

from __future__ import annotations

import threading
from typing import Any

from patinox.errors import RateLimited
from patinox.limits import WindowRateLimiter


def hammer(
    storage_uri: str,
    trials: list[tuple[str, str, int]],
    threads: int,
    attempts_per_thread: int,
    start: Any,
    results: Any,
) -> None:
    """For each trial ``(key_prefix, tenant_id, limit)``, hit that tenant's limit from
    ``threads`` threads once every party reached ``start``.

    ``start`` is a multiprocessing barrier counting every thread of every process (it is
    reused, one wait per trial), so all hits of a trial begin together. Puts one
    ``(trial index, admitted, refused, errors)`` per trial of this process on ``results``.
    """
    limiters = {prefix: WindowRateLimiter(storage_uri, key_prefix=prefix) for prefix, _, _ in trials}
    counts = [{"admitted": 0, "refused": 0, "errors": 0} for _ in trials]
    lock = threading.Lock()

    def run() -> None:
        for i, (prefix, tenant_id, limit) in enumerate(trials):
            limiter = limiters[prefix]
            start.wait(timeout=60)
            admitted = refused = errors = 0
            for _ in range(attempts_per_thread):
                try:
                    limiter.hit("tenant", limit, tenant_id=tenant_id)
                    admitted += 1
                except RateLimited:
                    refused += 1
                except Exception:  # a store failure: counted, never taken for an admission
                    errors += 1
            with lock:
                counts[i]["admitted"] += admitted
                counts[i]["refused"] += refused
                counts[i]["errors"] += errors

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for limiter in limiters.values():
        limiter.close()
    for i, c in enumerate(counts):
        results.put((i, c["admitted"], c["refused"], c["errors"]))
