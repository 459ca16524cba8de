"""Executors, one per isolation level. This build has ``namespace`` (in-process)."""

from patinox.isolation.namespace import NamespaceExecutor

__all__ = ["NamespaceExecutor"]
