"""Process-wide settings of a long-running Patinox server or worker process.

:func:`server_gc` sets CPython's cyclic garbage collector up for a server:

- **Freeze the start-up heap** (:func:`gc.freeze`): what start-up built (modules, models,
  schemas, compiled statements) lives as long as the process, so full collections no
  longer re-scan it.
- **Raise the young-generation threshold** to :data:`SERVER_GC_THRESHOLDS` (CPython's
  default is ``(700, 10, 10)``). A collection of generation 0 starts when allocations of
  container objects exceed deallocations by the first threshold. One synchronous run
  keeps about a thousand such objects alive at once (the request, the agent's graph, its
  messages, rows), so at 700 the collector ran inside nearly every run, scanned the
  objects of the runs in flight, and promoted them to older generations, whose
  collections then scanned them again. Memory is still reclaimed by reference counting
  as soon as an object is unreachable; only objects in reference cycles wait for a
  collection, which now comes every 50,000 net allocations (a few MB at most).

Measured on the 2-core machine of ``bench/throughput.py`` (32 clients, instant simulated
agent, server CPU time per run): 6.75 ms at ``(700, 10, 10)``, 5.84 ms at 10,000,
4.79 ms at 50,000. Source of the technique: Instagram Engineering, "Dismissing Python
Garbage Collection at Instagram" (2017), and the :func:`gc.freeze` documentation.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SERVER_GC_THRESHOLDS", "server_gc"]

#: Collector thresholds of a server process: generation 0, 1, 2 (see the module docstring).
SERVER_GC_THRESHOLDS = (50_000, 10, 10)


@contextmanager
def server_gc() -> Iterator[None]:
    """Collect once, freeze the heap and set :data:`SERVER_GC_THRESHOLDS` for the
    duration; restore the previous thresholds and unfreeze after, so an in-process caller
    (the tests) gets its collector back as it was."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVER_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
