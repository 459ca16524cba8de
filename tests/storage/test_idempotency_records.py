"""One tenant's ``Idempotency-Key`` records (:class:`patinox.storage.IdempotencyRecords`):
one taker per key even when every request arrives at once, per tenant, kept sealed, free
again after 24 hours."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from patinox.control import TenantSpec
from patinox.runtime import Runtime
from patinox.storage import IDEMPOTENCY_IN_PROGRESS_LEASE, IDEMPOTENCY_KEY_TTL, Begun, TenantStore, utcnow
from patinox.tenancy import StorageModel, TenantContext
from tests.conftest import ALL_DEPLOYMENTS, Deployment

FP, OTHER = "a" * 64, "b" * 64


def store_of(runtime: Runtime, deployment: Deployment, name: str) -> TenantStore:
    t = runtime.tenants.create(
        TenantSpec(name=name, storage_model=StorageModel(deployment.storage_model)), actor="test"
    )
    ctx = runtime.keys.authenticate(
        runtime.keys.create(tenant_id=t.id, name="k", scopes=None, actor="test").secret
    )
    assert isinstance(ctx, TenantContext)
    return runtime.backend.tenant_store(ctx)


@pytest.mark.parametrize("deployment", ALL_DEPLOYMENTS, indirect=True)
def test_of_concurrent_first_requests_exactly_one_takes_the_key(
    runtime: Runtime, deployment: Deployment
) -> None:
    store = store_of(runtime, deployment, "alpha")
    n = 12
    start = threading.Barrier(n)

    def take(_: int) -> Begun:
        records = store.idempotency()
        start.wait()  # every request reaches the insert together
        return records.begin("burst", FP)

    with ThreadPoolExecutor(n) as pool:
        outcomes = sorted(b.outcome for b in pool.map(take, range(n)))
    assert outcomes == ["in_progress"] * (n - 1) + ["new"]

    assert store.idempotency().finish("burst", FP, 202, '{"body": {"id": "run_1"}}')
    with ThreadPoolExecutor(n) as pool:
        again = list(pool.map(lambda _: store.idempotency().begin("burst", FP), range(n)))
    assert {(b.outcome, b.status, b.response) for b in again} == {
        ("replay", 202, '{"body": {"id": "run_1"}}')
    }
    assert store.idempotency().begin("burst", OTHER).outcome == "mismatch"


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool", "pg-silo"], indirect=True)
def test_keys_are_per_tenant(runtime: Runtime, deployment: Deployment) -> None:
    a, b = store_of(runtime, deployment, "alpha"), store_of(runtime, deployment, "beta")
    assert a.idempotency().begin("k", FP).outcome == "new"
    assert a.idempotency().finish("k", FP, 201, "A's answer")
    # B's store neither sees A's key (on PostgreSQL as the application role, under
    # row-level security) nor is refused by it.
    assert not b.idempotency().peek("k", FP)
    assert b.idempotency().begin("k", FP).outcome == "new"
    assert b.idempotency().finish("k", FP, 201, "B's answer")
    assert a.idempotency().begin("k", FP) == Begun("replay", 201, "A's answer")
    assert b.idempotency().begin("k", FP) == Begun("replay", 201, "B's answer")


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_a_key_expires_after_24_hours_and_is_then_deleted(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    records = store.idempotency()
    now = utcnow()
    assert timedelta(hours=24) == IDEMPOTENCY_KEY_TTL
    assert records.begin("old", FP, now=now).outcome == "new"
    assert records.finish("old", FP, 201, "first")
    assert records.begin("other", FP, now=now).outcome == "new"
    just_before = now + IDEMPOTENCY_KEY_TTL - timedelta(seconds=1)
    assert records.begin("old", OTHER, now=just_before).outcome == "mismatch"
    assert records.peek("old", FP, now=just_before)
    later = now + IDEMPOTENCY_KEY_TTL
    assert not records.peek("old", FP, now=later)
    # Taken again, for another request: the expired records of the tenant are deleted.
    assert records.begin("old", OTHER, now=later).outcome == "new"
    counted = store.bulk().count("idempotency_keys")
    assert counted == 1
    assert records.purge_expired(now=later + IDEMPOTENCY_KEY_TTL) == 1


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_a_kept_response_is_stored_sealed(runtime: Runtime, deployment: Deployment) -> None:
    store = store_of(runtime, deployment, "alpha")
    secret = "kept-response-secret-marker"
    store.idempotency().begin("k", FP)
    store.idempotency().finish("k", FP, 200, secret)
    (stored,) = [row for page in store.bulk().pages("idempotency_keys") for row in page]
    assert isinstance(stored["response"], bytes) and secret.encode() not in stored["response"]
    (opened,) = [row for page in store.bulk().pages("idempotency_keys", opened=True) for row in page]
    assert opened["response"] == secret


@pytest.mark.parametrize("deployment", ["sqlite-pool"], indirect=True)
def test_a_key_given_back_is_free_for_a_retry(runtime: Runtime, deployment: Deployment) -> None:
    records = store_of(runtime, deployment, "alpha").idempotency()
    assert records.begin("k", FP).outcome == "new"
    records.abandon("k", FP)
    assert records.begin("k", FP).outcome == "new"
    # Only the request that holds it gives it back, and only while in progress.
    records.abandon("k", OTHER)
    assert records.begin("k", FP).outcome == "in_progress"
    assert records.finish("k", FP, 201, "done")
    records.abandon("k", FP)
    assert records.begin("k", FP).outcome == "replay"


@pytest.mark.parametrize("deployment", ["sqlite-pool", "pg-pool"], indirect=True)
def test_a_key_left_in_progress_by_a_dead_request_is_taken_over_after_its_lease(
    runtime: Runtime, deployment: Deployment
) -> None:
    records = store_of(runtime, deployment, "alpha").idempotency()
    now = utcnow()
    assert records.begin("k", FP, now=now).outcome == "new"  # its process dies: never finished
    within = now + IDEMPOTENCY_IN_PROGRESS_LEASE - timedelta(seconds=1)
    assert records.begin("k", FP, now=within).outcome == "in_progress"
    after = now + IDEMPOTENCY_IN_PROGRESS_LEASE
    assert records.begin("k", OTHER, now=after).outcome == "mismatch"  # another request: never
    assert records.begin("k", FP, now=after).outcome == "new"
    assert records.begin("k", FP, now=after).outcome == "in_progress"  # one taker
    assert records.finish("k", FP, 201, "done")
    assert records.begin("k", FP, now=after + timedelta(hours=1)).outcome == "replay"
