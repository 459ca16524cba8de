"""Executors, one per isolation level: ``namespace`` (in the server process) and
``process`` (in the tenant's own warm execution processes), with the map that picks one
by the tenant's level.

Names are imported on first use (PEP 562): the template process
(``python -m patinox.isolation.template``) and what it forks load only their own modules,
never the host's side (pools, executors).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from patinox.isolation.levels import ExecutorMap, process_isolation_available
    from patinox.isolation.namespace import NamespaceExecutor
    from patinox.isolation.pool import PoolSettings, TenantPool
    from patinox.isolation.process import ProcessExecutor
    from patinox.isolation.supervisor import PoolSupervisor
    from patinox.isolation.template import Template

_SOURCES = {
    "ExecutorMap": "patinox.isolation.levels",
    "NamespaceExecutor": "patinox.isolation.namespace",
    "PoolSettings": "patinox.isolation.pool",
    "PoolSupervisor": "patinox.isolation.supervisor",
    "ProcessExecutor": "patinox.isolation.process",
    "Template": "patinox.isolation.template",
    "TenantPool": "patinox.isolation.pool",
    "process_isolation_available": "patinox.isolation.levels",
}

__all__ = [
    "ExecutorMap",
    "NamespaceExecutor",
    "PoolSettings",
    "PoolSupervisor",
    "ProcessExecutor",
    "Template",
    "TenantPool",
    "process_isolation_available",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use.

    Raises:
        AttributeError: ``name`` is not a public name of the package.
    """
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value
    return value
