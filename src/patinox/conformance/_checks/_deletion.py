"""Deleting a tenant shreds its keys and purges its data, also while its runs are in
flight, and leaves its neighbour and a successor under the same name untouched."""

from __future__ import annotations

import time

from patinox.conformance import _raw
from patinox.conformance._checks._common import TIMEOUT_S, decrypts, raises, seed
from patinox.conformance._deployment import ID_RE, Answer, SuiteEnv, Target, check, memory_get_call
from patinox.errors import TenantKeysDestroyed
from patinox.tenancy import new_id


def delete_shreds_and_purges(t: Target, _: SuiteEnv) -> None:
    """After deletion nothing of the tenant decrypts (its DEK is destroyed, also for a
    backend that never cached it) or is found (no row with its id in any table of any
    schema or database, its schema/database/file gone), its key is refused, the
    neighbour is intact, and a tenant re-created under the same name sees nothing."""
    a, b = t.new_tenant("del-a"), t.new_tenant("del-b")
    sa, sb = seed(t, a), seed(t, b)
    sealed_value = _raw.read_cell(t, a.id, "memory", "value", "key", sa["key"])
    sealed_input = _raw.read_cell(t, a.id, "runs", "input", "id", sa["run_id"])
    idem = sa["idempotency_key"]
    sealed_response = _raw.read_cell(t, a.id, "idempotency_keys", "response", "key", idem)
    message = sa["thread_message_id"]
    sealed_message = _raw.read_cell(t, a.id, "thread_messages", "content", "id", message)
    sealed_secret = _raw.read_cell(t, a.id, "webhook_endpoints", "secret", "id", sa["webhook_id"])
    before = _raw.count_tenant_rows(t, a.id)
    for table in (
        "agents",
        "memory",
        "runs",
        "tenant_keys",
        "idempotency_keys",
        "threads",
        "thread_messages",
        "webhook_endpoints",
    ):
        n = sum(v for k, v in before.items() if k.endswith(("." + table, ":" + table)))
        check(
            n > 0, f"before deletion no {table} row of the tenant was found: the row count cannot be trusted"
        )
    t.delete_tenant(a.id)

    err = raises(lambda: t.backend.keyring.current_key(a.id), TenantKeysDestroyed)
    check(
        isinstance(err, TenantKeysDestroyed), "the server's keyring still gives a DEK of the deleted tenant"
    )
    fresh = t.open_separate_backend()
    try:
        err = raises(lambda: fresh.keyring.current_key(a.id), TenantKeysDestroyed)
        check(isinstance(err, TenantKeysDestroyed), "a fresh backend still gives a DEK of the deleted tenant")
        for table, record, sealed in (
            ("memory.value", sa["key"], sealed_value),
            ("runs.input", sa["run_id"], sealed_input),
            ("idempotency_keys.response", idem, sealed_response),
            ("thread_messages.content", message, sealed_message),
            ("webhook_endpoints.secret", sa["webhook_id"], sealed_secret),
        ):
            check(
                sealed is not None and decrypts(fresh, a.id, table, record, sealed) is None,
                f"a ciphertext ({table}) saved before the deletion still decrypts",
            )
    finally:
        fresh.close()

    left = {k: v for k, v in _raw.count_tenant_rows(t, a.id).items() if v}
    check(not left, f"rows or storage of the deleted tenant remain: {left}")
    # Nothing of it anywhere: SQLite file bytes (secure delete, WAL truncated); on
    # PostgreSQL every live row of every table, including ones without a tenant_id column.
    raw = _raw.stored_bytes(t)
    stale = [
        k
        for k in (
            "agent_name",
            "instructions",
            "key",
            "agent_id",
            "run_id",
            "idempotency_key",
            "thread_id",
            "webhook_host",
            "webhook_id",
        )
        if sa[k].encode() in raw
    ]
    check(not stale, f"the deleted tenant's {stale} are still in the stored data")
    r: Answer = t.client.get("/v1/me", headers=a.h)
    check(r.status_code == 401, f"the deleted tenant's key answered {r.status_code}, not 401")

    # The neighbour is untouched.
    r = t.get_memory(b, sb["key"])
    check(r.status_code == 200 and r.json()["value"] == sb["value"], f"neighbour's memory: {r.text[:300]}")
    r = t.client.get("/v1/agents", headers=b.h)
    check([x["id"] for x in r.json()] == [sb["agent_id"]], f"neighbour's agents: {r.text[:300]}")

    # Same name again: a new tenant that sees nothing of the old one.
    a2 = t.new_tenant("del-a", name=a.name)
    check(a2.id != a.id, "the re-created tenant got the deleted tenant's id")
    for path in ("/v1/agents", "/v1/memory", "/v1/runs", "/v1/threads", "/v1/webhooks"):
        r = t.client.get(path, headers=a2.h)
        check(r.status_code == 200 and r.json() == [], f"re-created tenant: GET {path} = {r.text[:300]}")
    r = t.client.get("/v1/usage?since=2000-01-01T00:00:00Z", headers=a2.h)
    check(r.status_code == 200 and r.json()["records"] == [], f"re-created tenant's usage: {r.text[:300]}")
    for path, missing in (
        (f"/v1/memory/{sa['key']}", f"/v1/memory/{t.markers.atom()}"),
        (f"/v1/agents/{sa['agent_id']}", f"/v1/agents/{new_id('ag')}"),
        (f"/v1/runs/{sa['run_id']}", f"/v1/runs/{new_id('run')}"),
        (f"/v1/threads/{sa['thread_id']}", f"/v1/threads/{new_id('th')}"),
    ):
        old, new = t.client.get(path, headers=a2.h), t.client.get(missing, headers=a2.h)
        same = old.text.replace(path.rsplit("/", 1)[1], "X") == new.text.replace(
            missing.rsplit("/", 1)[1], "X"
        )
        check(
            old.status_code == 404 and same,
            f"re-created tenant: GET {path} = {old.status_code} {old.text[:200]}",
        )
    r = t.client.get("/v1/audit?limit=1000", headers=a2.h)
    old_things = set(sa.values()) | {a.id, a.key_id}
    seen = (set(t.markers.atom_re.findall(r.text)) | set(ID_RE.findall(r.text))) & old_things
    check(not seen, f"the re-created tenant's audit shows the deleted tenant's {sorted(seen)}")


def delete_with_runs_in_flight(t: Target, _: SuiteEnv) -> None:
    """Deleting a tenant while its async runs are still waiting on the model leaves
    nothing behind: no run, usage, audit or memory row is written after the purge by the
    runs finishing late, no new DEK is made for it, and a neighbour's runs queued beside
    them all finish normally."""
    a, b = t.new_tenant("inflight-a"), t.new_tenant("inflight-b")
    agents = {}
    for x in (a, b):
        key = t.markers.atom()
        t.put_memory(x, key, t.markers.atom())
        body = {"name": "slow", "model": "simulated:ttft_ms=150,tpot_ms=1", "tools": ["memory_get"]}
        r: Answer = t.client.post("/v1/agents", json=body, headers=x.h)
        check(r.status_code == 201, f"create slow agent: {r.status_code} {r.text[:300]}")
        agents[x.id] = (r.json()["id"], key)
    neighbour_runs = []
    for _attempt in range(3):
        for x in (a, b):
            aid, key = agents[x.id]
            run = {
                "input": f"{t.markers.atom()}\n{memory_get_call(key)}",
                "mode": "async",
                "output_tokens": 4,
            }
            r = t.client.post(f"/v1/agents/{aid}/runs", json=run, headers=x.h)
            check(r.status_code == 202, f"async run: {r.status_code} {r.text[:300]}")
            if x is b:
                neighbour_runs.append(r.json()["id"])
    t.delete_tenant(a.id)
    # The neighbour's runs, queued between the deleted tenant's, show when those would
    # have finished too.
    deadline = time.monotonic() + TIMEOUT_S
    pending = list(neighbour_runs)
    while pending:
        r = t.client.get(f"/v1/runs/{pending[0]}", headers=b.h)
        check(r.status_code == 200, f"neighbour's run: {r.status_code} {r.text[:300]}")
        if r.json()["status"] in ("succeeded", "failed"):
            check(r.json()["status"] == "succeeded", f"a neighbour's run failed: {r.json().get('error')}")
            pending.pop(0)
        else:
            check(time.monotonic() < deadline, "the neighbour's async runs did not finish")
            time.sleep(0.02)
    # ...plus one tenant-watch interval (1 s: a run that missed the deletion event is
    # stopped within it) for anything that would still land late.
    time.sleep(1.2)
    left = {k: v for k, v in _raw.count_tenant_rows(t, a.id).items() if v}
    check(not left, f"rows written after the deletion by runs in flight: {left}")
    check(_raw.dek_rows(t, a.id) == 0, "a DEK exists for the deleted tenant after its runs finished")
