"""A worker asks the queue again only when something it passed over may now be claimed:
at saturation runs end hundreds of times a second, and a claim at each was a sixth of the
process's throughput."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from patinox.control.worker import RunWorker
from patinox.limits import AdmissionSettings, FairShareAdmission
from patinox.runtime import Runtime


async def until(cond: Callable[[], bool], what: str, guard_s: float = 30.0) -> None:
    """Wait until ``cond()``; the guard only stops a hang, it is not what is tested."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + guard_s
    while not cond():
        if loop.time() > deadline:
            pytest.fail(f"still waiting after {guard_s:.0f} s: {what}")
        await asyncio.sleep(0.005)


def test_a_slot_freed_for_the_tenant_it_passed_over_asks_the_queue_nothing(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    admission = FairShareAdmission(AdmissionSettings(initial_limit=2, min_limit=2, max_limit=2))
    # No poll within the test: every claim is one the worker decided to make.
    worker = RunWorker(
        runtime.runs, runtime.queue, holder="claims", concurrency=8, poll_s=600, admission=admission
    )
    claims: list[frozenset[str]] = []
    real_claim = runtime.queue.claim

    def claim(*args: Any, **kwargs: Any) -> Any:
        claims.append(kwargs["skip"])
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(runtime.queue, "claim", claim)

    async def go() -> None:
        stop = asyncio.Event()
        # Tenant A's synchronous runs hold the whole limit and one more waits.
        assert admission.try_admit("tn_a", 4) and admission.try_admit("tn_a", 4)
        waiter = asyncio.ensure_future(admission.admit("tn_a", 4, max_wait_s=60))
        await asyncio.sleep(0)
        working = asyncio.ensure_future(worker.run(stop))
        await until(lambda: len(claims) == 1, "the first claim")
        assert claims[0] == frozenset({"tn_a"})  # the queue is empty of anyone else's runs
        for _ in range(20):  # A's runs end one by one; each slot goes to its next run
            admission.release("tn_a")
            await waiter
            waiter = asyncio.ensure_future(admission.admit("tn_a", 4, max_wait_s=60))
            for _ in range(10):
                await asyncio.sleep(0)
        assert len(claims) == 1  # nothing it passed over could be claimed: not asked
        # A run ends with none of A's waiting: room for anyone, so the worker asks.
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        admission.release("tn_a")
        await until(lambda: len(claims) == 2, "a claim once there is room")
        assert claims[1] == frozenset()
        # A run queued wakes it too.
        worker.wakeup.set()
        await until(lambda: len(claims) == 3, "a claim after a run was queued")
        stop.set()
        await working

    asyncio.run(go())
