"""Implementation of :mod:`patinox.storage.crypto`; import from there, not from here."""
