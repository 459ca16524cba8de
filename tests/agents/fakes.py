"""Test doubles for agent runs."""

from __future__ import annotations

import threading


class DictMemory:
    """An in-memory MemoryStore (one tenant's memory), safe to call from worker threads."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self._lock = threading.Lock()

    def memory_get(self, key: str) -> str | None:
        with self._lock:
            return self.data.get(key)

    def memory_put(self, key: str, value: str) -> None:
        with self._lock:
            self.data[key] = value

    def memory_list(self, prefix: str = "", limit: int = 100) -> list[str]:
        with self._lock:
            return sorted(k for k in self.data if k.startswith(prefix))[:limit]
