"""Webhook deliveries end to end, on every storage deployment: a run's settlement writes
one delivery per matching endpoint, a delivery loop sends it signed to a real local HTTPS
receiver (its certificate from a CA made for the test, its address allowed by the
operator), retries after a failure, disables an endpoint after consecutive failures, and
two loops never send one delivery twice."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event as sql_event

from patinox.client import verify_signature
from patinox.control import RunRequest, WebhookDispatcher, WebhookSettings
from patinox.control.webhooks import backoff_s
from patinox.limits import FairRunQueue
from patinox.network import OutboundGuard, OutboundPolicy
from patinox.network.outbound import Address
from patinox.runtime import Runtime
from patinox.storage import WebhookOutbox, utcnow
from patinox.tenancy import TenantContext
from tests._webhooks import (  # the shared fixtures and helpers of the webhook tests
    EVERY_DEPLOYMENT,
    ProcessDied,
    Receiver,
    Tenant,
    client,
    deliver,
    pending,
    receiver,
    rt,
)
from tests.conftest import Deployment

__all__ = ["client", "receiver", "rt"]  # fixtures used by name


@EVERY_DEPLOYMENT
def test_a_settled_run_is_delivered_signed_to_an_https_receiver(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url, ["run.succeeded"])
    secret = ep["secret"]
    run = t.run()
    assert run["status"] == "succeeded"
    (delivery,) = pending(rt, t.id, ep["id"])
    assert delivery["state"] == "pending" and delivery["run_id"] == run["id"]
    assert delivery["event_type"] == "run.succeeded"

    assert deliver(rt) == 1
    (got,) = receiver.received
    # The receiver's own check (Standard Webhooks), then the client helper's.
    msg_id, stamp = got.headers["webhook-id"], got.headers["webhook-timestamp"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + got.body, hashlib.sha256).digest()
    assert got.headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    assert verify_signature(secret, got.headers, got.body)
    assert not verify_signature(secret, got.headers, got.body + b" ")
    assert not verify_signature(secret, got.headers, got.body, now=int(stamp) + 301)  # a replay, later
    event = json.loads(got.body)
    assert event["type"] == "run.succeeded" and event["data"]["run_id"] == run["id"]
    assert event["data"]["output"] == run["output"] and msg_id == delivery["id"]

    (entry,) = t.log(ep["id"])
    assert entry["status_code"] == 200 and entry["error"] is None and entry["attempt"] == 1
    assert entry["duration_ms"] >= 0 and entry["delivery_id"] == delivery["id"]
    assert [d["state"] for d in pending(rt, t.id, ep["id"])] == ["succeeded"]
    assert deliver(rt) == 0 and len(receiver.received) == 1  # delivered once


@EVERY_DEPLOYMENT
def test_a_failed_attempt_is_retried_then_succeeds(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    receiver.answers = [500]
    t.run()
    assert deliver(rt) == 1
    assert [d["state"] for d in pending(rt, t.id, ep["id"])] == ["pending"]
    assert deliver(rt) == 1
    assert [d["state"] for d in pending(rt, t.id, ep["id"])] == ["succeeded"]
    log = t.log(ep["id"])
    assert [(e["attempt"], e["status_code"]) for e in log] == [(2, 200), (1, 500)]  # newest first
    assert log[1]["error"] == "the receiver answered 500"
    # The same delivery, the same webhook-id, on both attempts.
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1 and len(receiver.received) == 2
    r = client.get(f"/v1/webhooks/{ep['id']}", headers=t.h)
    assert r.json()["consecutive_failures"] == 0 and r.json()["state"] == "active"


@EVERY_DEPLOYMENT
def test_an_endpoint_is_disabled_after_consecutive_failures_and_audited(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    receiver.answers = [500] * 10
    t.run()
    for _ in range(3):
        assert deliver(rt) == 1
    got = client.get(f"/v1/webhooks/{ep['id']}", headers=t.h).json()
    assert got["state"] == "disabled" and got["consecutive_failures"] == 3 and got["disabled_at"]
    assert [d["state"] for d in pending(rt, t.id, ep["id"])] == ["failed"]
    audit = client.get("/v1/audit", headers=t.h, params={"limit": 500}).json()
    disabled = [a for a in audit if a["action"] == "webhook.disable"]
    assert len(disabled) == 1 and disabled[0]["target"] == ep["id"] and disabled[0]["actor"] == "system"
    # A disabled endpoint gets no new deliveries, until it is enabled again.
    t.run()
    assert len(pending(rt, t.id, ep["id"])) == 1 and deliver(rt) == 0
    r = client.post(f"/v1/webhooks/{ep['id']}/enable", headers=t.h)
    assert r.status_code == 200 and r.json()["state"] == "active"
    t.run()
    assert deliver(rt) == 1 and len(receiver.received) == 4


@EVERY_DEPLOYMENT
def test_rotation_signs_with_both_secrets_during_the_overlap(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    r = client.post(f"/v1/webhooks/{ep['id']}/rotate", json={"overlap_s": 3600}, headers=t.h)
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert new != ep["secret"] and r.json()["previous_secret_expires_at"]
    r = client.post(f"/v1/webhooks/{ep['id']}/ping", headers=t.h)
    assert r.status_code == 202
    assert deliver(rt) == 1
    got = receiver.received[-1]
    assert len(got.headers["webhook-signature"].split()) == 2
    assert verify_signature(ep["secret"], got.headers, got.body)
    assert verify_signature(new, got.headers, got.body)
    assert json.loads(got.body)["type"] == "webhook.ping"
    assert got.headers["webhook-id"] == r.json()["delivery_id"]
    # Rotated without an overlap: the previous secret no longer signs.
    newest = client.post(f"/v1/webhooks/{ep['id']}/rotate", json={"overlap_s": 0}, headers=t.h).json()[
        "secret"
    ]
    client.post(f"/v1/webhooks/{ep['id']}/ping", headers=t.h)
    assert deliver(rt) == 1
    got = receiver.received[-1]
    assert verify_signature(newest, got.headers, got.body)
    assert not verify_signature(new, got.headers, got.body)
    assert len(got.headers["webhook-signature"].split()) == 1


@EVERY_DEPLOYMENT
def test_a_cancelled_run_sends_run_cancelled_to_the_endpoints_that_asked_for_it(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    wants = t.endpoint(receiver.url, ["run.cancelled"])
    other = t.endpoint(receiver.url, ["run.succeeded"])
    queued = t.run(mode="async")  # no worker runs it
    r = client.post(f"/v1/runs/{queued['id']}/cancel", headers=t.h)
    assert r.status_code == 200, r.text
    assert [d["event_type"] for d in pending(rt, t.id, wants["id"])] == ["run.cancelled"]
    assert pending(rt, t.id, other["id"]) == []
    assert deliver(rt) == 1
    assert json.loads(receiver.received[0].body)["data"]["run_id"] == queued["id"]


@EVERY_DEPLOYMENT
def test_two_delivery_loops_send_each_delivery_once(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    endpoints = [t.endpoint(receiver.url), t.endpoint(receiver.url)]
    for _ in range(3):
        t.run()
    assert rt.webhooks is not None

    async def both() -> list[int]:
        a, b = rt.webhook_dispatcher(holder="loop-a"), rt.webhook_dispatcher(holder="loop-b")
        return list(await asyncio.gather(a.deliver_due(), b.deliver_due(), a.deliver_due(), b.deliver_due()))

    assert sum(asyncio.run(both())) == 6
    ids = [r.headers["webhook-id"] for r in receiver.received]
    assert len(ids) == 6 and len(set(ids)) == 6  # one delivery per run and endpoint, each sent once
    for ep in endpoints:
        assert [d["state"] for d in pending(rt, t.id, ep["id"])] == ["succeeded"] * 3


@EVERY_DEPLOYMENT
def test_concurrent_claims_of_one_delivery_take_it_once(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    """Both claims read the due delivery before either takes it (a barrier holds the first
    reader until the second has read too): exactly one wins."""
    t = Tenant(client, rt, "acme", deployment.storage_model)
    t.endpoint(receiver.url)
    t.run()
    barrier = threading.Barrier(2, timeout=30)
    calls: dict[int, int] = {}

    def control_tx(conn: Any = None) -> AbstractContextManager[Any]:
        @contextmanager
        def tx() -> Iterator[Any]:
            with rt.backend.control_tx(conn) as c:
                yield c
            me = threading.get_ident()
            calls[me] = calls.get(me, 0) + 1
            if calls[me] == 1:  # the candidates' read committed: wait for the other reader
                barrier.wait()

        return tx()

    outbox = WebhookOutbox(control_tx, rt.backend.engine)
    results: list[int] = []

    def claim(holder: str) -> None:
        results.append(len(outbox.claim(holder, lease_s=60)))

    threads = [threading.Thread(target=claim, args=(h,)) for h in ("one", "two")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == [0, 1]


@EVERY_DEPLOYMENT
def test_a_delivery_held_by_a_dead_loop_is_taken_again_after_its_lease(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    t.run()
    assert rt.webhooks is not None
    outbox = rt.webhooks.outbox
    (held,) = outbox.claim("dead-loop", lease_s=60)  # claimed, then its process died
    assert outbox.claim("live-loop", lease_s=60) == []
    later = utcnow() + timedelta(seconds=61)
    (again,) = outbox.claim("live-loop", lease_s=60, now=later)
    assert again.id == held.id and again.attempt == 1
    # The dead holder's late record is refused; the live one's stands.
    assert not outbox.record(
        held, at=utcnow(), status_code=200, error=None, duration_ms=1.0, state="succeeded"
    )
    assert outbox.record(again, at=utcnow(), status_code=200, error=None, duration_ms=1.0, state="succeeded")
    assert len(t.log(ep["id"])) == 1


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    import random

    settings = WebhookSettings(backoff_base_s=10.0, backoff_max_s=100.0)
    rng = random.Random(7)
    for attempt, full in ((1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (5, 100.0), (9, 100.0)):
        waits = {backoff_s(attempt, settings, rng) for _ in range(50)}
        assert all(full / 2 <= w <= full for w in waits) and len(waits) > 1, attempt


@EVERY_DEPLOYMENT
def test_a_name_resolving_to_loopback_is_not_sent_without_the_operators_allowance(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    """Registration cannot see where a name points; the send checks it. Under a policy
    without the operator's 127.0.0.0/8 (the deployment default), a name that resolves to
    127.0.0.1 is refused at the send, logged, and the receiver gets nothing."""
    t = Tenant(client, rt, "acme", deployment.storage_model)
    port = receiver.url.split(":")[2].split("/")[0]
    ep = t.endpoint(f"https://receiver.test:{port}/hook")
    t.run()

    async def loopback(host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address("127.0.0.1")]

    assert rt.webhooks is not None
    guard = OutboundGuard(OutboundPolicy(ca_bundle=receiver.ca_bundle), loopback)
    loop = WebhookDispatcher(rt.backend, rt.webhooks, holder="default-policy", guard=guard)
    assert asyncio.run(loop.deliver_due()) == 1
    assert receiver.received == []
    (entry,) = t.log(ep["id"])
    assert entry["status_code"] is None and "address_not_allowed" in entry["error"]
    # The same name under the operator's allowance reaches the receiver.
    allowed = OutboundGuard(rt.webhooks.settings.policy, loopback)
    assert (
        asyncio.run(WebhookDispatcher(rt.backend, rt.webhooks, holder="allowed", guard=allowed).deliver_due())
        == 1
    )
    assert len(receiver.received) == 1


@EVERY_DEPLOYMENT
def test_the_delivery_log_pages_newest_first(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    sent = [client.post(f"/v1/webhooks/{ep['id']}/ping", headers=t.h).json()["delivery_id"] for _ in range(3)]
    assert deliver(rt) == 3
    r = client.get(f"/v1/webhooks/{ep['id']}/deliveries", headers=t.h, params={"limit": 2})
    first = r.json()
    assert len(first) == 2 and 'rel="next"' in r.headers["Link"]
    nxt = r.headers["Link"].split(";")[0].strip("<>")
    second = client.get(nxt, headers=t.h).json()
    assert len(second) == 1
    entries = first + second
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    assert {e["delivery_id"] for e in entries} == set(sent)
    assert all(e["status_code"] == 200 and e["event_type"] == "webhook.ping" for e in entries)


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool", "pg-silo"], indirect=True)
def test_a_queue_worker_runs_the_delivery_loop_beside_it(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    """What ``patinox worker`` and the server's embedded worker run: a queued run is
    executed and settled by the worker, and its event sent by the worker's own delivery
    loop, with nothing driven by hand."""
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url, ["run.succeeded"])
    queued = t.run(mode="async")

    async def work() -> None:
        worker = rt.worker(concurrency=2, holder="worker:test")
        assert worker.webhooks is not None
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            for _ in range(1200):  # until it is recorded delivered (the worker polls), at most a minute
                if [d["state"] for d in pending(rt, t.id, ep["id"])] == ["succeeded"]:
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await task

    asyncio.run(work())
    (got,) = receiver.received
    assert verify_signature(ep["secret"], got.headers, got.body)
    event = json.loads(got.body)
    assert event["type"] == "run.succeeded" and event["data"]["run_id"] == queued["id"]
    assert event["data"]["mode"] == "async"
    assert [d["state"] for d in pending(rt, t.id, ep["id"])] == ["succeeded"]


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_finished_deliveries_and_old_log_entries_are_purged_after_the_retention(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    t.run()
    assert deliver(rt) == 1
    t.run()  # pending: kept whatever its age
    assert rt.webhooks is not None
    outbox = rt.webhooks.outbox
    assert outbox.purge_finished(utcnow() - timedelta(days=1)) == 0  # nothing that old
    assert outbox.purge_finished(utcnow() + timedelta(seconds=1)) == 2  # the delivery and its attempt
    assert [d["state"] for d in pending(rt, t.id, ep["id"])] == ["pending"]
    assert t.log(ep["id"]) == []


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-silo"], indirect=True)
def test_a_sync_run_whose_server_died_sends_run_failed_when_the_reaper_settles_it(
    client: TestClient,
    rt: Runtime,
    receiver: Receiver,
    deployment: Deployment,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process running a synchronous run dies mid-run: no settlement wrote its event.
    The reaper that records the run failed (interrupted) writes it."""
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url, ["run.failed"])
    ctx = rt.keys.authenticate(t.h["Authorization"].removeprefix("Bearer "))
    assert isinstance(ctx, TenantContext)
    real_release = FairRunQueue.release

    def release(self: FairRunQueue, *args: Any, holder: str | None = None, **kwargs: Any) -> bool:
        if holder is None:  # the synchronous run's own release of its hold
            raise ProcessDied
        return real_release(self, *args, holder=holder, **kwargs)

    async def die(*args: Any, **kwargs: Any) -> Any:
        raise ProcessDied

    monkeypatch.setattr(FairRunQueue, "release", release)
    monkeypatch.setattr(rt.runs._executor, "execute", die)
    with pytest.raises(ProcessDied):
        asyncio.run(rt.runs.start(ctx, t.agent, RunRequest(input="hello there", output_tokens=3)))
    assert pending(rt, t.id, ep["id"]) == []
    assert rt.runs.reap_expired(now=utcnow() + timedelta(days=1)) == 1
    (delivery,) = pending(rt, t.id, ep["id"])
    assert delivery["event_type"] == "run.failed"
    assert deliver(rt) == 1
    assert json.loads(receiver.received[0].body)["data"]["error"]["reason"] == "interrupted"


@pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)
def test_a_redirect_is_a_failed_attempt_never_followed(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url)
    receiver.answers = [307]
    client.post(f"/v1/webhooks/{ep['id']}/ping", headers=t.h)
    assert deliver(rt) == 1
    (entry,) = t.log(ep["id"])
    assert entry["status_code"] is None and "redirect" in entry["error"]
    assert len(receiver.received) == 1  # the one request; no second to where it pointed


@pytest.mark.parametrize("deployment", ["sqlite-pool", "sqlite-silo"], indirect=True)
def test_a_tenant_without_endpoints_costs_its_settlements_no_endpoint_query(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    """The tenant's active endpoints are served from the control-plane cache (on SQLite,
    where it is on): once read, a settlement reads no webhook_endpoints row, and creating,
    disabling, enabling or deleting an endpoint is seen by the next settlement."""
    t = Tenant(client, rt, "acme", deployment.storage_model)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "webhook_endpoints" in statement:
            statements.append(statement)

    engines = {rt.backend.engine, rt.backend.acting_on(t.id)._placement.engine}
    for engine in engines:
        sql_event.listen(engine, "before_cursor_execute", seen)
    try:
        assert t.run()["status"] == "succeeded"  # reads (none) and caches it
        statements.clear()
        for _ in range(3):
            assert t.run()["status"] == "succeeded"
        assert statements == []  # no endpoint: no query on the run path

        ep = t.endpoint(receiver.url, ["run.succeeded"])
        t.run()
        assert len(pending(rt, t.id, ep["id"])) == 1  # the new endpoint was seen
        statements.clear()
        t.run()
        assert statements == [] and len(pending(rt, t.id, ep["id"])) == 2  # and is cached

        store = rt.backend.acting_on(t.id)
        assert store.webhooks().record_attempt(ep["id"], ok=False, disable_after=1)  # disabled
        t.run()
        assert len(pending(rt, t.id, ep["id"])) == 2
        r = client.post(f"/v1/webhooks/{ep['id']}/enable", headers=t.h)
        assert r.status_code == 200, r.text
        t.run()
        assert len(pending(rt, t.id, ep["id"])) == 3
        assert client.delete(f"/v1/webhooks/{ep['id']}", headers=t.h).status_code == 200
        assert pending(rt, t.id, ep["id"]) == []  # its deliveries forgotten
        t.run()
        assert pending(rt, t.id, ep["id"]) == []
    finally:
        for engine in engines:
            sql_event.remove(engine, "before_cursor_execute", seen)


@EVERY_DEPLOYMENT
def test_a_suspended_tenants_deliveries_wait_until_it_is_resumed(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url, ["run.succeeded"])
    t.run()
    rt.tenants.suspend(t.id, actor="test")
    assert deliver(rt) == 0 and receiver.received == []
    (waiting,) = pending(rt, t.id, ep["id"])
    assert waiting["state"] == "pending" and waiting["attempts"] == 0

    # One claimed before the suspension is given back unattempted.
    assert rt.webhooks is not None
    rt.tenants.resume(t.id, actor="test")
    (claimed,) = rt.webhooks.outbox.claim("loop-a", lease_s=60.0)
    rt.tenants.suspend(t.id, actor="test")
    asyncio.run(rt.webhook_dispatcher(holder="loop-a")._deliver(claimed))
    assert receiver.received == []
    (waiting,) = pending(rt, t.id, ep["id"])
    assert waiting["state"] == "pending" and waiting["attempts"] == 0  # and unheld: sent below at once

    rt.tenants.resume(t.id, actor="test")
    assert deliver(rt) == 1 and len(receiver.received) == 1
    assert [d["state"] for d in pending(rt, t.id, ep["id"])] == ["succeeded"]


@EVERY_DEPLOYMENT
def test_a_deleted_tenants_pending_deliveries_are_dropped(
    client: TestClient, rt: Runtime, receiver: Receiver, deployment: Deployment
) -> None:
    t = Tenant(client, rt, "acme", deployment.storage_model)
    ep = t.endpoint(receiver.url, ["run.succeeded"])
    t.run()
    rt.tenants.suspend(t.id, actor="test")
    rt.tenants.delete(t.id, actor="test")
    assert deliver(rt) == 0 and receiver.received == []
    assert pending(rt, t.id, ep["id"]) == []
