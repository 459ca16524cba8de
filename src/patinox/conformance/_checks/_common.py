"""What several check families share: tenants seeded with markers, a bound on waits,
and the small probes of an error and of a stored ciphertext."""

from __future__ import annotations

from collections.abc import Callable

from patinox.conformance._deployment import Target, TenantHandle, check, memory_get_call
from patinox.errors import DecryptionFailed, TenantKeysDestroyed
from patinox.storage import SqlBackend
from patinox.storage.crypto import decrypt_str

#: Longest wait, seconds, for a barrier, a thread, a worker process or an async run.
TIMEOUT_S = 120.0


def raises(
    fn: Callable[..., object], *errors: type[BaseException], args: tuple[object, ...] = ()
) -> BaseException | None:
    """The error ``fn(*args)`` raised if it is one of ``errors``; ``None`` if it returned.

    Any other error propagates.
    """
    try:
        fn(*args)
    except errors as err:
        return err
    return None


def decrypts(
    backend: SqlBackend, tenant_id: str, table: str, record_id: str, sealed: bytes | None
) -> str | None:
    """The plaintext of a stored sealed value of ``table`` (``"memory.value"``, the column
    as the AAD names it) and ``record_id``, or ``None`` when it no longer decrypts (its DEK
    is destroyed, or the ciphertext does not authenticate)."""
    assert sealed is not None
    try:
        return decrypt_str(
            sealed,
            key_lookup=backend.keyring.key_lookup(tenant_id),
            tenant_id=tenant_id,
            table=table,
            record_id=record_id,
        )
    except (TenantKeysDestroyed, DecryptionFailed):
        return None


def seed(t: Target, tenant: TenantHandle) -> dict[str, str]:
    """Give ``tenant`` an agent, a memory value and a run that reads it back; every stored
    string is a fresh marker.

    Returns:
        The markers and ids by role: ``key``, ``value``, ``agent_name``, ``instructions``,
        ``prompt``, ``idempotency_key`` (the run was sent with it: its response is kept,
        sealed), ``agent_id`` and ``run_id``; ``thread_id``, ``thread_input`` (a run on that
        conversation thread was sent it: a sealed message) and ``thread_message_id`` (its
        message); ``webhook_host`` (in the URL of a webhook endpoint), ``webhook_id`` and
        ``webhook_secret`` (its signing secret, stored sealed).

    Raises:
        ConformanceFailure: the run's ``memory_get`` did not return the tenant's value.
    """
    m = t.markers
    s = {
        "key": m.atom(),
        "value": m.atom(),
        "agent_name": m.atom(),
        "instructions": m.atom(),
        "prompt": m.atom(),
        "idempotency_key": m.atom(),
    }
    t.put_memory(tenant, s["key"], s["value"])
    s["agent_id"] = t.new_agent(tenant, s["agent_name"], s["instructions"])
    run = t.run(
        tenant,
        s["agent_id"],
        f"{s['prompt']} question\n{memory_get_call(s['key'])}",
        idempotency_key=s["idempotency_key"],
    )
    check(s["value"] in str(run["output"]), f"the run's memory_get did not return the tenant's value: {run}")
    s["run_id"] = str(run["id"])
    r = t.client.post("/v1/threads", json={}, headers=tenant.h)
    check(r.status_code == 201, f"POST /v1/threads for {tenant.name}: {r.status_code} {r.text[:300]}")
    s["thread_id"] = str(r.json()["id"])
    s["thread_input"] = m.atom()
    body = {"agent_id": s["agent_id"], "input": f"{s['thread_input']} question", "output_tokens": 4}
    r = t.client.post(f"/v1/threads/{s['thread_id']}/runs", json=body, headers=tenant.h)
    check(r.status_code == 200, f"a run on a thread for {tenant.name}: {r.status_code} {r.text[:300]}")
    s["thread_message_id"] = str(r.json()["messages"][0]["id"])
    # A webhook endpoint (for failed runs only: the seed's run succeeded, so nothing is sent
    # to its host, which does not exist): its secret is stored sealed.
    s["webhook_host"] = m.atom()
    body = {"url": f"https://{s['webhook_host']}.example.invalid/hook", "event_types": ["run.failed"]}
    r = t.client.post("/v1/webhooks", json=body, headers=tenant.h)
    check(r.status_code == 201, f"registering a webhook endpoint: {r.status_code} {r.text[:300]}")
    s["webhook_id"] = str(r.json()["id"])
    s["webhook_secret"] = str(r.json()["secret"])
    return s
