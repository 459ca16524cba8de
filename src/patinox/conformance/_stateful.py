"""The stateful isolation test: random tenant workloads against a model of what each owns.

A hypothesis :class:`~hypothesis.stateful.RuleBasedStateMachine` drives three tenants
through the HTTP API at random: agent creates, reads, updates, deletes and lists; memory
writes, reads, deletes and lists; runs (sync and async, some calling the ``memory_get``
tool on keys of *other* tenants); suspensions and resumptions; tenant deletions and
re-creations under the same name. It keeps a model of what every tenant incarnation owns.

Every secret a tenant stores is a unique marker string (see
:class:`~patinox.conformance._deployment.Markers`), and every id the API hands out is
recorded with its owner. The checks:

* on **every response** to tenant X: no marker or id of another tenant appears, unless
  X itself sent it in a request (then it is X's own data: a key X asked for, an id X
  probed);
* after **every step** (invariant), for **every** tenant: each list the step could have
  changed (agents, memory keys, runs: a memory write cannot change an agents table)
  equals the tenant's model exactly, as listed by the API; suspended tenants get
  ``403 tenant_suspended``; keys of tenants deleted in the example get
  ``401 unauthenticated``;
* a **foreign id** (another tenant's agent, run or memory key) answers exactly like a
  missing one: same status, same body once the id itself is blanked out;
* usage records, audit records, ``/v1/me`` and prefix listings show exactly the tenant's
  own.

Between examples the deployment is not reset: the live tenants of an example are emptied
through the API in teardown and carried into the next example (creating a silo tenant
costs a database, emptying it a few requests); deleted ones are replaced by new tenants
with fresh names. Each example starts from empty tenants, seeds each with an agent of a
shared name, a value under a shared key and a run, and the deployment keeps the residue
(usage, audit, purged tenants) of every earlier example and check, as a real one would.
Shrinking is off: each step is real I/O, and the failing sequence is reported as found.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.reporting import with_reporter
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from patinox.conformance._deployment import (
    ID_RE,
    PROBES,
    Answer,
    ConformanceFailure,
    Target,
    auth,
    check,
    memory_get_call,
)
from patinox.conformance._tenant_model import LISTS, Agent, Incarnation, Run, lists_changed_by
from patinox.tenancy import new_id

N_TENANTS = 3
#: Tenant deletions per example (each costs a schema or database on bridge and silo).
MAX_DELETIONS = 1
MODEL = "simulated:instant"
TOOLS = ["memory_get", "memory_list"]
SHARED_AGENT_NAMES = ("helper", "planner")
SHARED_KEYS = ("shared-0", "shared-1")
_EVERYTHING = "since=2000-01-01T00:00:00Z"
_Step = TypeVar("_Step", bound=Callable[..., None])
_SLOT = st.integers(0, N_TENANTS - 1)
_PICK = st.integers(0, 1_000_000)


def run_stateful(t: Target, *, examples: int, steps: int, report: Callable[[object], None]) -> None:
    """Run the state machine on ``t`` for ``examples`` examples of up to ``steps`` steps.

    Raises:
        AssertionError: a check failed (hypothesis reports the steps to ``report``).
    """
    machine, seen = machine_for(t)
    config = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        # No shrinking: every step is a real request against a real database; the failing
        # sequence is reported as found, in bounded time.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        report_multiple_bugs=False,
        print_blob=False,
    )
    try:
        with with_reporter(report):
            run_state_machine_as_test(machine, settings=config)
    except ConformanceFailure:
        raise
    except Exception as err:
        if not seen:
            raise
        raise ConformanceFailure(f"{seen[0]} (then hypothesis: {type(err).__name__})") from err


@dataclass(eq=False)
class _Shared:
    """What the examples of one run on one deployment share."""

    target: Target
    #: Numbers the examples, for fresh tenant names.
    examples: Iterator[int] = field(default_factory=itertools.count)
    #: Marker or id -> its owner, across examples.
    owner_of: dict[str, Incarnation] = field(default_factory=dict)
    #: Tenants handed from one example to the next, emptied through the API in teardown
    #: (creating a silo tenant costs a database; emptying one costs a few requests).
    kept: list[Incarnation | None] = field(default_factory=lambda: [None] * N_TENANTS)
    #: The steps' failures, first first.
    failures: list[str] = field(default_factory=list)


def machine_for(t: Target) -> tuple[type[RuleBasedStateMachine], list[str]]:
    """The state machine class bound to deployment ``t`` (a subclass of
    :class:`TenantIsolation` with its own :class:`_Shared` state), and the list its steps
    append their failures to, first first."""
    shared = _Shared(t)
    machine = type(TenantIsolation.__name__, (TenantIsolation,), {"shared": shared})
    return machine, shared.failures


def _noted(fn: _Step) -> _Step:
    """Record a step's failure before hypothesis sees it: hypothesis may report a
    failure it could not replay as "flaky" and drop the original message."""

    @functools.wraps(fn)
    def step(self: TenantIsolation, *args: Any, **kwargs: Any) -> None:
        try:
            fn(self, *args, **kwargs)
        except Exception as err:
            self.shared.failures.append(
                str(err) if isinstance(err, AssertionError) else f"{type(err).__name__}: {err}"
            )
            raise

    return cast(_Step, step)


class TenantIsolation(RuleBasedStateMachine):
    """Three tenant slots driven at random through the HTTP API, checked against a model of
    what each tenant incarnation owns (see the module's docstring).

    Not run as is: :func:`machine_for` binds it to one deployment by subclassing it with
    :attr:`shared` set.
    """

    shared: ClassVar[_Shared]

    def __init__(self) -> None:
        super().__init__()
        self.example = next(self.shared.examples)
        self.deletions = 0
        # The lists a step may have changed, for any tenant; checked after the step.
        self.dirty: set[str] = set(LISTS)
        self.slots: list[Incarnation] = []
        for slot in range(N_TENANTS):
            inc = self.shared.kept[slot]
            self.shared.kept[slot] = None
            if inc is None:
                inc = self._create(slot, 0, self.t.markers.tenant_name(f"e{self.example}-s{slot}"))
            self.slots.append(inc)
        self.all: list[Incarnation] = list(self.slots)
        for inc in self.slots:
            self._seed(inc)
        self.dirty = set(LISTS)

    @property
    def t(self) -> Target:
        """The deployment under test."""
        return self.shared.target

    def _seed(self, inc: Incarnation) -> None:
        """Every tenant starts with an agent of a shared name, a value under a shared
        key and a run, so other tenants' probes have targets from the first step."""
        self.create_agent(inc.slot, True, 0)
        self.memory_put(inc.slot, "shared", 0)
        self.run(inc.slot, 0, "own", "sync")

    # -- plumbing ------------------------------------------------------------------

    def _create(self, slot: int, gen: int, name: str) -> Incarnation:
        r = self.t.client.post("/admin/tenants", json=self.t.tenant_spec(name), headers=self.t.op)
        check(r.status_code == 201, f"creating tenant {name}: {r.status_code} {r.text[:300]}")
        tid = str(r.json()["id"])
        k = self.t.client.post(f"/admin/tenants/{tid}/keys", json={"name": "k"}, headers=self.t.op)
        check(k.status_code == 201, f"creating a key of {name}: {k.status_code} {k.text[:300]}")
        inc = Incarnation(slot, gen, name, tid, str(k.json()["key"]), str(k.json()["id"]))
        self._own(inc, tid, inc.key_id)
        return inc

    def _own(self, inc: Incarnation, *things: str) -> None:
        for thing in things:
            inc.owned.add(thing)
            self.shared.owner_of[thing] = inc

    def _atom(self, inc: Incarnation) -> str:
        atom = self.t.markers.atom()
        self._own(inc, atom)
        return atom

    def call(self, inc: Incarnation, method: str, path: str, body: dict[str, Any] | None = None) -> Answer:
        """A request of ``inc`` with its key; every response is scanned for foreign data."""
        if method != "GET":
            self.dirty |= lists_changed_by(method, path)
        r = self.t.client.request(method, path, json=body, headers=auth(inc.key))
        sent = path + ("" if body is None else json.dumps(body))
        inc.known.update(self.t.markers.atom_re.findall(sent), ID_RE.findall(sent))
        self._scan(inc, f"{method} {path}", r)
        return r

    def _scan(self, inc: Incarnation, what: str, r: Answer) -> None:
        body = r.text
        for atom in set(self.t.markers.atom_re.findall(body)):
            if atom not in inc.owned and atom not in inc.known:
                owner = self.shared.owner_of.get(atom)
                whose = owner.label if owner else "another check of this run"
                check(
                    False,
                    f"LEAK: {what} by {inc.label} answered {r.status_code} with marker "
                    f"{atom} stored by {whose}: {body[:300]}",
                )
        for ident in set(ID_RE.findall(body)):
            owner = self.shared.owner_of.get(ident)
            if owner is not None and owner is not inc and ident not in inc.known:
                check(
                    False,
                    f"LEAK: {what} by {inc.label} answered {r.status_code} with id {ident} "
                    f"of {owner.label}: {body[:300]}",
                )

    @staticmethod
    def _gate(inc: Incarnation, r: Answer, what: str) -> bool:
        """True when ``inc`` is active; else check the refusal its state calls for."""
        if inc.state == "active":
            return True
        status, code = (401, "unauthenticated") if inc.state == "deleted" else (403, "tenant_suspended")
        _expect_error(r, status, code, f"{what} by {inc.state} {inc.label}")
        return False

    def _foreign(self, inc: Incarnation, kind: str) -> list[str]:
        out: list[str] = []
        for other in self.all:
            if other is inc:
                continue
            if kind == "agent":
                out += list(other.agents) + [i for k, i in other.gone if k == "agent"]
            elif kind == "run":
                out += list(other.runs) + [i for k, i in other.gone if k == "run"]
            else:
                out += [key for key in other.memory if key not in inc.memory]
        return sorted(set(out))

    # -- agents --------------------------------------------------------------------

    @rule(slot=_SLOT, shared=st.booleans(), pick=_PICK)
    @_noted
    def create_agent(self, slot: int, shared: bool, pick: int) -> None:
        inc = self.slots[slot]
        name = SHARED_AGENT_NAMES[pick % 2] if shared else self._atom(inc)
        instructions = self._atom(inc)
        body = {"name": name, "model": MODEL, "instructions": instructions, "tools": TOOLS}
        r = self.call(inc, "POST", "/v1/agents", body)
        if not self._gate(inc, r, "create agent"):
            return
        if any(a.name == name for a in inc.agents.values()):
            _expect_error(r, 409, "already_exists", f"second agent named {name}")
            return
        check(r.status_code == 201, f"create agent: {r.status_code} {r.text[:300]}")
        got = r.json()
        check((got["name"], got["instructions"]) == (name, instructions), f"created agent differs: {got}")
        inc.agents[got["id"]] = Agent(name, instructions)
        self._own(inc, got["id"])

    @rule(slot=_SLOT, pick=_PICK)
    @_noted
    def get_agent(self, slot: int, pick: int) -> None:
        inc = self.slots[slot]
        aid = _pick(sorted(inc.agents), pick) or new_id("ag")
        r = self.call(inc, "GET", f"/v1/agents/{aid}")
        if not self._gate(inc, r, "get agent"):
            return
        if aid not in inc.agents:
            _expect_error(r, 404, "not_found", "get missing agent")
            return
        check(r.status_code == 200, f"get own agent: {r.status_code} {r.text[:300]}")
        a = inc.agents[aid]
        got = r.json()
        check((got["name"], got["instructions"]) == (a.name, a.instructions), f"agent {aid} is {got}")

    @rule(slot=_SLOT, pick=_PICK, rename=st.booleans(), shared=st.booleans())
    @_noted
    def update_agent(self, slot: int, pick: int, rename: bool, shared: bool) -> None:
        inc = self.slots[slot]
        aid = _pick(sorted(inc.agents), pick)
        if aid is None:
            return
        if rename:
            new_name = SHARED_AGENT_NAMES[pick % 2] if shared else self._atom(inc)
            body = {"name": new_name}
        else:
            body = {"instructions": self._atom(inc)}
        r = self.call(inc, "PATCH", f"/v1/agents/{aid}", body)
        if not self._gate(inc, r, "update agent"):
            return
        if rename and any(a.name == body["name"] for i, a in inc.agents.items() if i != aid):
            _expect_error(r, 409, "already_exists", "rename onto a taken name")
            return
        check(r.status_code == 200, f"update own agent: {r.status_code} {r.text[:300]}")
        agent = inc.agents[aid]
        agent.name = body.get("name", agent.name)
        agent.instructions = body.get("instructions", agent.instructions)
        got = r.json()
        check((got["name"], got["instructions"]) == (agent.name, agent.instructions), f"updated: {got}")

    @rule(slot=_SLOT, pick=_PICK)
    @_noted
    def delete_agent(self, slot: int, pick: int) -> None:
        inc = self.slots[slot]
        aid = _pick(sorted(inc.agents), pick) or new_id("ag")
        r = self.call(inc, "DELETE", f"/v1/agents/{aid}")
        if not self._gate(inc, r, "delete agent"):
            return
        if aid not in inc.agents:
            _expect_error(r, 404, "not_found", "delete missing agent")
            return
        check(r.status_code == 204, f"delete own agent: {r.status_code} {r.text[:300]}")
        del inc.agents[aid]
        inc.gone.append(("agent", aid))
        for rid in [rid for rid, run in inc.runs.items() if run.agent_id == aid]:
            del inc.runs[rid]
            inc.gone.append(("run", rid))

    # -- memory --------------------------------------------------------------------

    @rule(slot=_SLOT, which=st.sampled_from(["shared", "new", "existing"]), pick=_PICK)
    @_noted
    def memory_put(self, slot: int, which: str, pick: int) -> None:
        inc = self.slots[slot]
        if which == "shared":
            key = SHARED_KEYS[pick % 2]
        else:
            key = (_pick(sorted(inc.memory), pick) if which == "existing" else None) or self._atom(inc)
        value = self._atom(inc)
        r = self.call(inc, "PUT", f"/v1/memory/{key}", {"value": value})
        if not self._gate(inc, r, "memory put"):
            return
        check(r.status_code == 200, f"memory put: {r.status_code} {r.text[:300]}")
        inc.memory[key] = value

    @rule(slot=_SLOT, pick=_PICK)
    @_noted
    def memory_get(self, slot: int, pick: int) -> None:
        inc = self.slots[slot]
        key = _pick(sorted(inc.memory), pick) or self._atom(inc)
        r = self.call(inc, "GET", f"/v1/memory/{key}")
        if not self._gate(inc, r, "memory get"):
            return
        if key not in inc.memory:
            _expect_error(r, 404, "not_found", "get missing memory key")
            return
        check(r.status_code == 200, f"memory get: {r.status_code} {r.text[:300]}")
        check(r.json()["value"] == inc.memory[key], f"memory {key} is {r.json()}, not {inc.memory[key]}")

    @rule(slot=_SLOT, pick=_PICK)
    @_noted
    def memory_delete(self, slot: int, pick: int) -> None:
        inc = self.slots[slot]
        key = _pick(sorted(inc.memory), pick) or self._atom(inc)
        r = self.call(inc, "DELETE", f"/v1/memory/{key}")
        if not self._gate(inc, r, "memory delete"):
            return
        if key not in inc.memory:
            _expect_error(r, 404, "not_found", "delete missing memory key")
            return
        check(r.status_code == 204, f"memory delete: {r.status_code} {r.text[:300]}")
        del inc.memory[key]

    # -- runs ----------------------------------------------------------------------

    @rule(
        slot=_SLOT,
        pick=_PICK,
        tool=st.sampled_from(["none", "own", "foreign", "missing", "list"]),
        mode=st.sampled_from(["sync", "async"]),
    )
    @_noted
    def run(self, slot: int, pick: int, tool: str, mode: str) -> None:
        inc = self.slots[slot]
        aid = _pick(sorted(inc.agents), pick)
        if aid is None:
            return
        prompt, key = self._atom(inc) + " please answer", None
        if tool == "own":
            key = _pick(sorted(inc.memory), pick)
        elif tool == "foreign":
            key = _pick(self._foreign(inc, "memory"), pick)
        elif tool == "missing":
            key = self._atom(inc)
        if key is not None:
            prompt += "\n" + memory_get_call(key)
        elif tool == "list":
            prompt += '\n/call memory_list {"prefix": ""}'
        body = {"input": prompt, "output_tokens": 64, "mode": mode}
        r = self.call(inc, "POST", f"/v1/agents/{aid}/runs", body)
        if not self._gate(inc, r, "run"):
            return
        check(
            r.status_code == (200 if mode == "sync" else 202),
            f"{mode} run: {r.status_code} {r.text[:300]}",
        )
        rid = str(r.json()["id"])
        self._own(inc, rid)
        got = r.json() if mode == "sync" else self._wait(inc, rid)
        check(got["status"] == "succeeded", f"run {rid} ended {got['status']}: {got.get('error')}")
        check(got["input"] == prompt, f"run {rid} input came back as {got['input']!r}")
        output = str(got["output"])
        expected = inc.memory.get(key) if key is not None else None
        if expected is not None:
            check(expected in output, f"memory_get of own key {key} did not return its value: {output}")
        if key is not None:
            check("memory_get" in output, f"run {rid} did not call memory_get: {output}")
        inc.runs[rid] = Run(aid, prompt, got["output"])
        inc.usage_runs.add(rid)

    def _wait(self, inc: Incarnation, rid: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            g = self.call(inc, "GET", f"/v1/runs/{rid}")
            check(g.status_code == 200, f"polling async run {rid}: {g.status_code} {g.text[:300]}")
            got: dict[str, Any] = g.json()
            if got["status"] in ("succeeded", "failed"):
                return got
            check(time.monotonic() < deadline, f"async run {rid} still {got['status']} after 30 s")
            time.sleep(0.005)

    @rule(slot=_SLOT, pick=_PICK, by_agent=st.booleans())
    @_noted
    def get_run(self, slot: int, pick: int, by_agent: bool) -> None:
        inc = self.slots[slot]
        if by_agent:
            aid = _pick(sorted(inc.agents), pick)
            if aid is None:
                return
            r = self.call(inc, "GET", f"/v1/runs?agent_id={aid}&limit=500")
            if self._gate(inc, r, "list runs of an agent"):
                want = sorted(rid for rid, run in inc.runs.items() if run.agent_id == aid)
                check(
                    r.status_code == 200 and sorted(x["id"] for x in r.json()) == want,
                    f"runs of agent {aid}: {r.status_code} {r.text[:300]}, expected {want}",
                )
            return
        rid = _pick(sorted(inc.runs), pick) or new_id("run")
        r = self.call(inc, "GET", f"/v1/runs/{rid}")
        if not self._gate(inc, r, "get run"):
            return
        if rid not in inc.runs:
            _expect_error(r, 404, "not_found", "get missing run")
            return
        check(r.status_code == 200, f"get own run: {r.status_code} {r.text[:300]}")
        run, got = inc.runs[rid], r.json()
        check(
            (got["agent_id"], got["input"], got["output"]) == (run.agent_id, run.input, run.output),
            f"run {rid} is {got}",
        )

    # -- probes of other tenants' objects -------------------------------------------

    @rule(slot=_SLOT, probe=st.sampled_from(PROBES), pick=_PICK)
    @_noted
    def probe_foreign(self, slot: int, probe: tuple[str, str, str, dict[str, Any] | None], pick: int) -> None:
        inc = self.slots[slot]
        kind, method, template, body = probe
        foreign = _pick(self._foreign(inc, kind), pick)
        if foreign is None:
            return
        missing = {"agent": new_id("ag"), "run": new_id("run")}.get(kind) or self._atom(inc)
        a = self.call(inc, method, template.format(id=foreign), body)
        b = self.call(inc, method, template.format(id=missing), body)
        what = f"{method} {template} with {kind} {foreign} of another tenant"
        check(
            a.status_code == b.status_code,
            f"{what} answered {a.status_code}, a missing one {b.status_code}: {a.text[:300]}",
        )
        check(
            a.text.replace(foreign, "<ID>") == b.text.replace(missing, "<ID>"),
            f"{what} answered {a.text[:300]!r}, a missing one {b.text[:300]!r}",
        )
        if inc.state == "active":
            expected = 200 if "?agent_id" in template else 404
            check(a.status_code == expected, f"{what} answered {a.status_code}, expected {expected}")

    # -- reads that return everything of a tenant ----------------------------------------

    @rule(slot=_SLOT, what=st.sampled_from(["me", "audit", "usage", "prefix"]))
    @_noted
    def read_everything(self, slot: int, what: str) -> None:
        inc = self.slots[slot]
        path = {
            "me": "/v1/me",
            "audit": "/v1/audit?limit=1000",
            "usage": f"/v1/usage?{_EVERYTHING}",
            "prefix": "/v1/memory?prefix=shared-&limit=1000",
        }[what]
        r = self.call(inc, "GET", path)
        if not self._gate(inc, r, f"GET {path}"):
            return
        check(r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:300]}")
        got = r.json()
        if what == "me":
            check(got["tenant_id"] == inc.id, f"/v1/me of {inc.label} says {got['tenant_id']}")
        elif what == "audit":
            bad = [x for x in got if x["tenant_id"] != inc.id]
            check(not bad, f"audit of {inc.label} holds records of others: {bad[:3]}")
        elif what == "usage":
            runs = sorted(x["run_id"] for x in got["records"])
            check(
                runs == sorted(inc.usage_runs),
                f"usage of {inc.label} lists runs {runs}, expected {sorted(inc.usage_runs)}",
            )
        else:
            want = sorted(k for k in inc.memory if k.startswith("shared-"))
            check(sorted(got) == want, f"memory with prefix shared- is {got}, expected {want}")

    # -- lifecycle -------------------------------------------------------------------

    def _slots_in(self, *states: str) -> list[int]:
        return [i.slot for i in self.slots if i.state in states]

    @precondition(lambda self: self._slots_in("active", "suspended"))
    @rule(pick=_PICK)
    @_noted
    def suspend_or_resume(self, pick: int) -> None:
        self.dirty = set(LISTS)
        slot = _pick_int(self._slots_in("active", "suspended"), pick)
        if slot is None:
            return
        inc = self.slots[slot]
        action = "suspend" if inc.state == "active" else "resume"
        r = self.t.client.post(f"/admin/tenants/{inc.id}/{action}", headers=self.t.op)
        check(r.status_code == 200, f"{action} {inc.label}: {r.status_code} {r.text[:300]}")
        inc.state = "suspended" if action == "suspend" else "active"
        check(r.json()["state"] == inc.state, f"{action} left state {r.json()['state']}")

    @precondition(lambda self: self._slots_in("active", "suspended") and self.deletions < MAX_DELETIONS)
    @rule(pick=_PICK)
    @_noted
    def delete_tenant(self, pick: int) -> None:
        self.dirty = set(LISTS)
        slot = _pick_int(self._slots_in("active", "suspended"), pick)
        if slot is None:
            return
        inc = self.slots[slot]
        self.t.delete_tenant(inc.id)
        inc.state = "deleted"
        self.deletions += 1

    @precondition(lambda self: self._slots_in("deleted"))
    @rule(pick=_PICK)
    @_noted
    def recreate_tenant(self, pick: int) -> None:
        self.dirty = set(LISTS)
        slot = _pick_int(self._slots_in("deleted"), pick)
        if slot is None:
            return
        inc = self.slots[slot]
        self.slots[slot] = self._create(slot, inc.gen + 1, inc.name)
        self.all.append(self.slots[slot])

    # -- after every step -----------------------------------------------------------------

    @invariant()
    @_noted
    def every_tenant_sees_exactly_its_own(self) -> None:
        lists, self.dirty = self.dirty, set()
        for inc in self.slots:
            if inc.state == "active" and lists:
                self._check_lists(inc, lists)
            elif inc.state == "suspended":
                r = self.call(inc, "GET", "/v1/agents")
                _expect_error(r, 403, "tenant_suspended", f"GET /v1/agents by suspended {inc.label}")
        for dead in [i for i in self.all if i.state == "deleted"][-N_TENANTS:]:
            r = self.call(dead, "GET", "/v1/me")
            _expect_error(r, 401, "unauthenticated", f"GET /v1/me with the key of deleted {dead.label}")

    def _check_lists(self, inc: Incarnation, lists: set[str]) -> None:
        if "agents" in lists:
            r = self.call(inc, "GET", "/v1/agents")
            check(r.status_code == 200, f"list agents: {r.status_code} {r.text[:300]}")
            got = {a["id"]: (a["name"], a["instructions"]) for a in r.json()}
            want = {i: (a.name, a.instructions) for i, a in inc.agents.items()}
            check(
                len(r.json()) == len(got) and got == want,
                f"agents of {inc.label}: {got}, expected {want}",
            )
        if "memory" in lists:
            r = self.call(inc, "GET", "/v1/memory?limit=1000")
            check(r.status_code == 200, f"list memory: {r.status_code} {r.text[:300]}")
            got_keys, want_keys = sorted(r.json()), sorted(inc.memory)
            check(got_keys == want_keys, f"memory keys of {inc.label}: {got_keys}, expected {want_keys}")
        if "runs" in lists:
            r = self.call(inc, "GET", "/v1/runs?limit=500")
            check(r.status_code == 200, f"list runs: {r.status_code} {r.text[:300]}")
            runs = sorted(x["id"] for x in r.json())
            check(runs == sorted(inc.runs), f"runs of {inc.label}: {runs}, expected {sorted(inc.runs)}")

    def teardown(self) -> None:
        """Empty each live tenant through the API and keep it for the next example; a
        tenant that cannot be emptied is deleted instead (the next example starts clean
        either way, and its first invariant check verifies that)."""
        for inc in self.slots:
            if inc.state == "deleted":
                continue
            try:
                self._empty(inc)
                self.shared.kept[inc.slot] = inc
            except Exception:
                with contextlib.suppress(Exception):
                    self.t.delete_tenant(inc.id)

    def _empty(self, inc: Incarnation) -> None:
        if inc.state == "suspended":
            resumed = self.t.client.post(f"/admin/tenants/{inc.id}/resume", headers=self.t.op)
            check(resumed.status_code == 200, f"resume: {resumed.status_code}")
            inc.state = "active"
        for aid in list(inc.agents):
            check(self.call(inc, "DELETE", f"/v1/agents/{aid}").status_code == 204, "delete agent")
            inc.gone.append(("agent", aid))
        for rid in inc.runs:
            inc.gone.append(("run", rid))
        for key in list(inc.memory):
            check(self.call(inc, "DELETE", f"/v1/memory/{key}").status_code == 204, "delete memory")
        inc.agents.clear()
        inc.runs.clear()
        inc.memory.clear()
        for path in ("/v1/agents", "/v1/memory", "/v1/runs"):
            r = self.call(inc, "GET", path)
            check(r.status_code == 200 and r.json() == [], f"{path} not empty after emptying")


def _pick(items: list[str], pick: int) -> str | None:
    return items[pick % len(items)] if items else None


def _pick_int(items: list[int], pick: int) -> int | None:
    return items[pick % len(items)] if items else None


def _expect_error(r: Answer, status: int, code: str, what: str) -> None:
    ok = r.status_code == status
    if ok:
        try:
            ok = r.json()["error"]["code"] == code
        except (ValueError, KeyError, TypeError):
            ok = False
    check(ok, f"{what}: expected {status} {code}, got {r.status_code} {r.text[:300]}")
