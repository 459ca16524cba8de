"""The tenant-scoped data layer: backends chosen by URL, control-plane and tenant stores."""

from patinox.storage._cache import MISS
from patinox.storage._fast import write as execute_write
from patinox.storage.backend import (
    PreparedWrite,
    SqlBackend,
    StorageBackend,
    TenantStore,
    open_backend,
    utcnow,
)
from patinox.storage.engine import make_engine, migrate, translate_errors

__all__ = [
    "MISS",
    "PreparedWrite",
    "SqlBackend",
    "StorageBackend",
    "TenantStore",
    "execute_write",
    "make_engine",
    "migrate",
    "open_backend",
    "translate_errors",
    "utcnow",
]
