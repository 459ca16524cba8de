"""A tenant's routes answer with its own data only: another tenant's ids answer like
missing ones, and the same keys, values, agents and questions of two tenants never mix."""

from __future__ import annotations

from typing import Any

from patinox.conformance import _raw
from patinox.conformance._checks._common import seed
from patinox.conformance._deployment import (
    PROBES,
    Answer,
    SuiteEnv,
    Target,
    TenantHandle,
    check,
    memory_get_call,
)
from patinox.tenancy import new_id


def foreign_ids_like_missing(t: Target, _: SuiteEnv) -> None:
    """Every tenant route given another tenant's agent id, run id, memory key or thread id answers
    exactly like one given a missing id (status and body, modulo the id), and changes
    nothing of the owner (the same property the state machine samples, here each case)."""
    a, b = t.new_tenant("foreign-a"), t.new_tenant("foreign-b")
    sa = seed(t, a)
    foreign = {"agent": sa["agent_id"], "run": sa["run_id"], "memory": sa["key"], "thread": sa["thread_id"]}
    for kind, method, template, body in PROBES:
        missing = {"agent": new_id("ag"), "run": new_id("run"), "thread": new_id("th")}.get(
            kind
        ) or t.markers.atom()
        x: Answer = t.client.request(method, template.format(id=foreign[kind]), json=body, headers=b.h)
        y: Answer = t.client.request(method, template.format(id=missing), json=body, headers=b.h)
        what = f"{method} {template} with another tenant's {kind}"
        expected = 200 if "?agent_id" in template else 404
        check(
            x.status_code == expected, f"{what} answered {x.status_code}, expected {expected}: {x.text[:300]}"
        )
        check(
            (x.status_code, x.text.replace(foreign[kind], "<ID>"))
            == (y.status_code, y.text.replace(missing, "<ID>")),
            f"{what} answered {x.status_code} {x.text[:200]!r}, "
            f"a missing one {y.status_code} {y.text[:200]!r}",
        )
    r: Answer = t.client.get(f"/v1/agents/{sa['agent_id']}", headers=a.h)
    check(
        r.status_code == 200 and r.json()["instructions"] == sa["instructions"],
        f"owner's agent: {r.text[:300]}",
    )
    r = t.client.get(f"/v1/runs/{sa['run_id']}", headers=a.h)
    check(r.status_code == 200 and r.json()["input"].startswith(sa["prompt"]), f"owner's run: {r.text[:300]}")
    r = t.get_memory(a, sa["key"])
    check(r.status_code == 200 and r.json()["value"] == sa["value"], f"owner's memory: {r.text[:300]}")
    r = t.client.get(f"/v1/threads/{sa['thread_id']}/messages", headers=a.h)
    check(
        r.status_code == 200
        and [m["content"] for m in r.json()][:1] == [f"{sa['thread_input']} question"]
        and len(r.json()) == 2,
        f"owner's thread after the probes: {r.text[:300]}",
    )
    r = t.client.get("/v1/runs", headers=a.h)
    owned = {x["id"] for x in r.json()}
    check(sa["run_id"] in owned and len(owned) == 2, f"owner's runs after the probes: {r.text[:300]}")


def same_cache_key_material(t: Target, _: SuiteEnv) -> None:
    """Two tenants store the same key with the same value, define the same agent and ask
    the same question: each gets only its own answers, before and after one changes."""
    a, b = t.new_tenant("same-a"), t.new_tenant("same-b")
    key, value = "cache-question", "same-answer-material"
    for x in (a, b):
        t.put_memory(x, key, value)
    sealed = [_raw.read_cell(t, x.id, "memory", "value", "key", key) for x in (a, b)]
    check(sealed[0] != sealed[1], "the same value of two tenants is stored as the same ciphertext")
    agents = {x.id: t.new_agent(x, "answerer", "answer from memory") for x in (a, b)}
    question = "what is the answer\n" + memory_get_call(key)
    runs: dict[str, list[str]] = {a.id: [], b.id: []}

    def ask(x: TenantHandle, expected: str, not_expected: str | None = None) -> None:
        run = t.run(x, agents[x.id], question)
        runs[x.id].append(str(run["id"]))
        out = str(run["output"])
        check(expected in out, f"{x.id} asked and got {out!r}, expected its own {expected!r}")
        check(
            not_expected is None or not_expected not in out, f"{x.id} got the other tenant's answer: {out!r}"
        )

    def value_of(x: TenantHandle) -> Any:
        r = t.get_memory(x, key)
        return r.json()["value"] if r.status_code == 200 else r.status_code

    ask(a, value)
    ask(b, value)
    va = t.markers.atom()
    t.put_memory(a, key, va)
    check(value_of(b) == value and value_of(a) == va, "one tenant's write changed the other's value")
    ask(a, va)
    ask(b, value, va)
    vb = t.markers.atom()
    t.put_memory(b, key, vb)
    ask(a, va, vb)
    ask(b, vb, va)
    check(t.client.delete(f"/v1/memory/{key}", headers=a.h).status_code == 204, "delete failed")
    check(value_of(a) == 404 and value_of(b) == vb, "one tenant's delete changed the other's value")
    for x in (a, b):
        listed: Answer = t.client.get("/v1/runs", headers=x.h)
        check(listed.status_code == 200, f"runs of {x.id}: {listed.status_code} {listed.text[:300]}")
        got = sorted(r["id"] for r in listed.json())
        check(got == sorted(runs[x.id]), f"runs of {x.id}: {got}, expected {sorted(runs[x.id])}")
    new_instructions = t.markers.atom()
    r = t.client.patch(f"/v1/agents/{agents[a.id]}", json={"instructions": new_instructions}, headers=a.h)
    check(r.status_code == 200, f"patch agent: {r.status_code}")
    r = t.client.get(f"/v1/agents/{agents[b.id]}", headers=b.h)
    check(
        r.json()["instructions"] == "answer from memory", f"the other tenant's agent changed: {r.text[:300]}"
    )


def idempotency_keys_per_tenant(t: Target, _: SuiteEnv) -> None:
    """An ``Idempotency-Key`` belongs to the tenant that sent it: two tenants sending the
    same key each get a run of their own, and each retry answers its own tenant's first
    response (never the other's), with nothing run again."""
    a, b = t.new_tenant("idem-a"), t.new_tenant("idem-b")
    key = t.markers.atom()
    first: dict[str, dict[str, Any]] = {}
    for x in (a, b):
        agent = t.new_agent(x, t.markers.atom(), "answer briefly")
        first[x.id] = {
            "agent": agent,
            "run": t.run(x, agent, f"{t.markers.atom()} question", idempotency_key=key),
        }
    check(
        first[a.id]["run"]["id"] != first[b.id]["run"]["id"],
        "two tenants' requests with the same Idempotency-Key got the same run",
    )
    for x in (a, b):
        mine = first[x.id]
        r: Answer = t.client.post(
            f"/v1/agents/{mine['agent']}/runs",
            json={"input": mine["run"]["input"], "output_tokens": 48},
            headers={**x.h, "Idempotency-Key": key},
        )
        check(
            r.status_code == 200 and r.json()["id"] == mine["run"]["id"],
            f"{x.name}'s retry answered {r.status_code} {r.text[:200]}, not its own first run",
        )
        listed = t.client.get("/v1/runs", headers=x.h).json()
        check(
            [run["id"] for run in listed] == [mine["run"]["id"]],
            f"{x.name} has {len(listed)} runs after a retry with its Idempotency-Key, expected 1",
        )


#: Routes of one webhook endpoint: (method, path after ``/v1/webhooks/{id}``, body).
_WEBHOOK_PROBES: tuple[tuple[str, str, dict[str, Any] | None], ...] = (
    ("GET", "", None),
    ("GET", "/deliveries", None),
    ("POST", "/rotate", {"overlap_s": 0}),
    ("POST", "/ping", None),
    ("POST", "/enable", None),
    ("DELETE", "", None),
)


def webhooks_per_tenant(t: Target, _: SuiteEnv) -> None:
    """Every webhook route given another tenant's endpoint id answers exactly like one
    given a missing id, and changes nothing of the owner's endpoint (not rotated, not
    deleted, no delivery queued); a tenant's list shows its own endpoints only."""
    a, b = t.new_tenant("hook-a"), t.new_tenant("hook-b")
    sa = seed(t, a)
    foreign = sa["webhook_id"]
    before: Answer = t.client.get(f"/v1/webhooks/{foreign}", headers=a.h)
    check(before.status_code == 200, f"owner's endpoint: {before.status_code} {before.text[:300]}")
    for method, suffix, body in _WEBHOOK_PROBES:
        missing = new_id("whe")
        x: Answer = t.client.request(method, f"/v1/webhooks/{foreign}{suffix}", json=body, headers=b.h)
        y: Answer = t.client.request(method, f"/v1/webhooks/{missing}{suffix}", json=body, headers=b.h)
        what = f"{method} /v1/webhooks/{{id}}{suffix} with another tenant's endpoint"
        check(x.status_code == 404, f"{what} answered {x.status_code}, expected 404: {x.text[:300]}")
        check(
            x.text.replace(foreign, "<ID>") == y.text.replace(missing, "<ID>"),
            f"{what} answered {x.text[:200]!r}, a missing one {y.text[:200]!r}",
        )
    listed: Answer = t.client.get("/v1/webhooks", headers=b.h)
    check(listed.status_code == 200 and listed.json() == [], f"another tenant's list: {listed.text[:300]}")
    after: Answer = t.client.get(f"/v1/webhooks/{foreign}", headers=a.h)
    check(after.json() == before.json(), f"the owner's endpoint changed: {after.text[:300]}")
    log: Answer = t.client.get(f"/v1/webhooks/{foreign}/deliveries", headers=a.h)
    check(log.status_code == 200 and log.json() == [], f"the owner's delivery log: {log.text[:300]}")
