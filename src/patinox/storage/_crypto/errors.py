"""The runtime failures of envelope encryption (defined in :mod:`patinox.errors`)."""

from __future__ import annotations

from patinox.errors import DecryptionFailed, TenantKeysDestroyed

__all__ = ["DecryptionFailed", "TenantKeysDestroyed"]
