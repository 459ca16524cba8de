"""One line of ``patinox doctor``: what a host can enforce, and the fix for what it lacks."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Check"]


@dataclass(frozen=True, kw_only=True)
class Check:
    """One capability of this host.

    Attributes:
        name: what is checked, short (``cgroup memory controller``, ``bubblewrap``).
        ok: whether this host has it.
        detail: what was found (a version, a path, the error seen).
        fix: what to do when ``ok`` is false (a command or a setting); ``None`` when ok.
    """

    name: str
    ok: bool
    detail: str
    fix: str | None = None
