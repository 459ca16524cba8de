"""Envelope encryption defends payloads at rest: no plaintext below Patinox, each
ciphertext bound to its tenant, table, column and row, and one DEK per tenant even when
its first writers race."""

from __future__ import annotations

import threading

from patinox.conformance import _raw
from patinox.conformance._checks._common import TIMEOUT_S, decrypts, seed
from patinox.conformance._deployment import Answer, ConformanceFailure, SuiteEnv, Target, check
from patinox.errors import PatinoxError


def no_plaintext_at_rest(t: Target, _: SuiteEnv) -> None:
    """Raw storage holds no plaintext of an encrypted payload (memory values, run inputs,
    run outputs, the responses kept for an ``Idempotency-Key``, which repeat the run's
    input, the messages of a conversation thread, webhook signing secrets), while it does hold
    the unencrypted columns of the same rows."""
    tenants = [t.new_tenant(label) for label in ("plain-a", "plain-b")]
    seeds = [seed(t, x) for x in tenants]
    raw = _raw.stored_bytes(t)
    for x, s in zip(tenants, seeds, strict=True):
        sealed = _raw.read_cell(t, x.id, "memory", "value", "key", s["key"])
        check(
            sealed is not None and _raw.scan_form(t, sealed) in raw,
            "the stored ciphertext of a memory value is not in raw storage: the scan missed the rows",
        )
        kept = _raw.read_cell(t, x.id, "idempotency_keys", "response", "key", s["idempotency_key"])
        check(
            kept is not None and _raw.scan_form(t, kept) in raw,
            "the stored ciphertext of a kept Idempotency-Key response is not in raw storage",
        )
        message = _raw.read_cell(t, x.id, "thread_messages", "content", "id", s["thread_message_id"])
        check(
            message is not None and _raw.scan_form(t, message) in raw,
            "the stored ciphertext of a thread message is not in raw storage",
        )
        kept = _raw.read_cell(t, x.id, "webhook_endpoints", "secret", "id", s["webhook_id"])
        check(
            kept is not None and _raw.scan_form(t, kept) in raw,
            "the stored ciphertext of a webhook signing secret is not in raw storage",
        )
        # Positive control: names and keys are stored in clear, so the scan saw these rows.
        for visible in (
            "agent_name",
            "key",
            "idempotency_key",
            "thread_id",
            "thread_message_id",
            "webhook_host",
        ):
            check(
                s[visible].encode() in raw,
                f"raw scan did not reach the rows holding the {visible} {s[visible]}",
            )
        for secret in ("value", "prompt", "thread_input", "webhook_secret"):
            check(
                s[secret].encode() not in raw, f"plaintext of an encrypted payload ({secret}) in raw storage"
            )


def ciphertext_bound_to_row(t: Target, _: SuiteEnv) -> None:
    """A ciphertext copied to another row, column or tenant fails authentication: the API
    answers ``500 decryption_failed`` and shows no plaintext."""
    a, b = t.new_tenant("move-a"), t.new_tenant("move-b")
    m = t.markers
    k1, k2, secret = m.atom(), m.atom(), m.atom()
    t.put_memory(a, k1, secret)
    t.put_memory(a, k2, "placeholder")
    t.put_memory(b, k1, "placeholder")
    aid, bid = t.new_agent(a, "mover"), t.new_agent(b, "mover")
    prompt = m.atom()
    r1 = t.run(a, aid, prompt)["id"]
    r2, r3 = t.run(a, aid, m.atom())["id"], t.run(a, aid, m.atom())["id"]
    rb = t.run(b, bid, m.atom())["id"]
    moves = [
        (
            "memory value to another key of the same tenant",
            (a, "memory", "value", "key", k1),
            (a, "memory", "value", "key", k2),
            a,
            f"/v1/memory/{k2}",
            secret,
        ),
        (
            "memory value to the same key of another tenant",
            (a, "memory", "value", "key", k1),
            (b, "memory", "value", "key", k1),
            b,
            f"/v1/memory/{k1}",
            secret,
        ),
        (
            "run input to another run of the same tenant",
            (a, "runs", "input", "id", r1),
            (a, "runs", "input", "id", r2),
            a,
            f"/v1/runs/{r2}",
            prompt,
        ),
        (
            "run input to the output column of the same run",
            (a, "runs", "input", "id", r1),
            (a, "runs", "output", "id", r3),
            a,
            f"/v1/runs/{r3}",
            prompt,
        ),
        (
            "run input to a run of another tenant",
            (a, "runs", "input", "id", r1),
            (b, "runs", "input", "id", rb),
            b,
            f"/v1/runs/{rb}",
            prompt,
        ),
    ]
    for what, (st, table, col, kcol, key), (dt, dtable, dcol, dkcol, dkey), reader, path, plain in moves:
        stored = _raw.read_cell(t, st.id, table, col, kcol, key)
        check(
            stored is not None and decrypts(t.backend, st.id, f"{table}.{col}", key, stored) is not None,
            f"{what}: the source is not a ciphertext of its own row: {stored!r}",
        )
        assert stored is not None
        _raw.write_cell(t, dt.id, dtable, dcol, dkcol, dkey, stored)
        r: Answer = t.client.get(path, headers=reader.h)
        ok = r.status_code == 500 and r.json().get("error", {}).get("code") == "decryption_failed"
        check(ok, f"{what}: expected 500 decryption_failed, got {r.status_code} {r.text[:300]}")
        check(plain not in r.text, f"{what}: the answer shows the plaintext")
    # The originals still decrypt where they belong.
    r = t.get_memory(a, k1)
    check(
        r.status_code == 200 and r.json()["value"] == secret, f"original memory value broken: {r.text[:300]}"
    )
    r = t.client.get(f"/v1/runs/{r1}", headers=a.h)
    check(r.status_code == 200 and r.json()["input"] == prompt, f"original run broken: {r.text[:300]}")


def first_dek_race(t: Target, _: SuiteEnv) -> None:
    """Eight writers, each with its own backend (as separate server processes have), make
    the first encrypted writes of a brand-new tenant at once: one DEK row results and every
    row is readable by every writer and through the API."""
    a = t.new_tenant("race")
    check(_raw.dek_rows(t, a.id) == 0, "a brand-new tenant already has a DEK: the race cannot be staged")
    ctx = t.context(a)
    n = 8
    values = [t.markers.atom() for _ in range(n)]
    backends = [t.open_separate_backend() for _ in range(n)]
    try:
        barrier = threading.Barrier(n)
        errors: list[BaseException] = []

        def write(i: int) -> None:
            try:
                store = backends[i].tenant_store(ctx)
                barrier.wait(TIMEOUT_S)
                store.memory_put(f"race-{i}", values[i])
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(TIMEOUT_S)
        check(not errors, f"concurrent first writes failed: {[repr(e) for e in errors[:3]]}")
        check(_raw.dek_rows(t, a.id) == 1, f"{_raw.dek_rows(t, a.id)} DEK rows after the race, expected 1")
        for j, backend in enumerate(backends):
            store = backend.tenant_store(ctx)
            for i in range(n):
                try:
                    got = store.memory_get(f"race-{i}")
                except PatinoxError as err:
                    raise ConformanceFailure(
                        f"writer {j} cannot read the row of writer {i}: {err!r}"
                    ) from err
                check(got == values[i], f"writer {j} reads {got!r} for the row of writer {i}")
    finally:
        for backend in backends:
            backend.close()
    for i in range(n):
        r = t.get_memory(a, f"race-{i}")
        check(
            r.status_code == 200 and r.json()["value"] == values[i],
            f"race-{i} through the API: {r.text[:300]}",
        )
