"""``patinox worker``: a queue worker process.

A queue worker claims queued (async) runs from the deployment's database and executes
them (:class:`~patinox.control.worker.RunWorker`); it holds the deployment's database
credentials and KEK. It serves no HTTP: this module, and everything it imports, never
imports FastAPI or :mod:`patinox.api` (an import-linter contract in ``pyproject.toml``
says so). It is not the tenant execution process that the ``process``, ``container`` and
``dedicated`` isolation levels will run a tenant's agents in, which holds no credentials.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from patinox.cli._deployment import DEFAULT_DATA_DIR, DataDir, open_runtime
from patinox.cli._output import say


def worker(
    concurrency: Annotated[
        int,
        typer.Option(
            min=1,
            max=1024,
            help="most runs executed at once (within it, as many as the fair share of this "
            "process's capacity allows, unless PATINOX_FAIR_SHARE=off)",
        ),
    ] = 256,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Execute queued (async) runs until interrupted; run as many as you like beside the servers.

    Set PATINOX_DATABASE_URL, PATINOX_OWNER_URL and PATINOX_KEK_URL (or --data-dir) to the
    same deployment as the API servers. Events are logged as JSON lines on stderr
    (PATINOX_LOG_LEVEL, default info).
    """
    from patinox._logs import configure_logging

    configure_logging()
    rt = open_runtime(data_dir)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        w = rt.worker(concurrency=concurrency)
        watches = [asyncio.create_task(rt.runs.watch_tenants())]
        if rt.runs.admission is not None:
            watches.append(asyncio.create_task(rt.runs.admission.watch(rt.runs.calls.wait_window)))
        fair = " as this process's capacity allows" if rt.runs.admission is not None else ""
        say(f"Patinox worker {w.holder} executing up to {concurrency} runs at once{fair}")
        try:
            await w.run(stop)
        finally:
            for watch in watches:
                watch.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
            await rt.runs.shutdown()
        say(f"Worker stopped after {w.completed} runs.")

    from patinox._process import server_gc
    from patinox.limits import fair_loop

    fair = rt.settings.admission.enabled
    with server_gc(), asyncio.Runner(loop_factory=fair_loop.new_event_loop if fair else None) as runner:
        runner.run(go())  # as `patinox serve` (see patinox._process), on a tenant-fair loop
