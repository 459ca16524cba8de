"""The model the stateful isolation test holds a deployment to: what each tenant
incarnation owns, and which of its lists a request may change."""

from __future__ import annotations

from dataclasses import dataclass, field

#: The lists every tenant has, as the API lists them: ``/v1/agents``, ``/v1/memory``,
#: ``/v1/runs``.
LISTS = ("agents", "memory", "runs")


def lists_changed_by(method: str, path: str) -> set[str]:
    """The tenant lists a (non-GET) request may change, for whichever tenant it touches."""
    if path.startswith("/v1/memory"):
        return {"memory"}
    if "/runs" in path:
        return {"runs"}
    if path.startswith("/v1/agents"):
        return {"agents", "runs"} if method == "DELETE" else {"agents"}
    return set(LISTS)


@dataclass
class Agent:
    """An agent as its tenant defined it."""

    name: str
    instructions: str


@dataclass
class Run:
    """A finished run as its tenant saw it answered."""

    agent_id: str
    input: str
    output: str | None


@dataclass(eq=False)
class Incarnation:
    """One life of a tenant slot: created, used, maybe suspended, deleted."""

    slot: int
    gen: int
    name: str
    id: str
    key: str
    key_id: str
    state: str = "active"
    agents: dict[str, Agent] = field(default_factory=dict)
    memory: dict[str, str] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)
    gone: list[tuple[str, str]] = field(default_factory=list)  # (kind, id) deleted by the tenant
    usage_runs: set[str] = field(default_factory=set)
    owned: set[str] = field(default_factory=set)
    known: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        """How failure messages name it: slot, life and tenant id."""
        return f"tenant {self.slot} (life {self.gen}, {self.id})"
