"""One map says which columns are sealed; a tenant's sealer seals and opens whole rows by
it, and its blobs open for that tenant, row and column only."""

from __future__ import annotations

from pathlib import Path

import pytest

from patinox.errors import DecryptionFailed
from patinox.storage import SealedColumn, sealed_columns
from patinox.storage import schema as s
from patinox.storage._sealer import Sealer
from patinox.storage.crypto import FileKeyProvider, InMemoryDekStore, TenantKeyring


@pytest.fixture
def keyring(tmp_path: Path) -> TenantKeyring:
    return TenantKeyring(InMemoryDekStore(), FileKeyProvider.create(tmp_path / "kek.json"))


def test_the_map_names_every_sealed_column_of_real_tables() -> None:
    assert set(sealed_columns()) == {
        SealedColumn("memory", "key", "value", "memory.value"),
        SealedColumn("runs", "id", "input", "runs.input"),
        SealedColumn("runs", "id", "output", "runs.output"),
        SealedColumn("idempotency_keys", "key", "response", "idempotency_keys.response"),
        SealedColumn("threads", "id", "metadata", "threads.metadata"),
        SealedColumn("thread_messages", "id", "content", "thread_messages.content"),
        SealedColumn("webhook_endpoints", "id", "secret", "webhook_endpoints.secret"),
        SealedColumn("webhook_endpoints", "id", "previous_secret", "webhook_endpoints.previous_secret"),
        SealedColumn("secrets", "name", "value", "secrets.value"),
    }
    for c in sealed_columns():
        table = s.metadata.tables[c.table]
        assert {c.key_column, c.column} <= set(table.c.keys())
    assert [c.column for c in sealed_columns("runs")] == ["input", "output"]
    assert sealed_columns("agents") == ()


def test_rows_seal_and_open_by_the_map_and_only_for_their_row(keyring: TenantKeyring) -> None:
    mine = Sealer(keyring, "tn_a")
    row = {"id": "run_1", "input": "hello", "output": None, "status": "succeeded"}
    sealed = mine.seal_row("runs", dict(row))
    assert isinstance(sealed["input"], bytes) and sealed["output"] is None and sealed["status"] == "succeeded"
    assert mine.open_row("runs", dict(sealed)) == row
    # Another row, another tenant: the blob does not open.
    with pytest.raises(DecryptionFailed):
        mine.open_row("runs", {**sealed, "id": "run_2"})
    with pytest.raises(DecryptionFailed):
        Sealer(keyring, "tn_b").open_row("runs", dict(sealed))
    # A table without sealed columns is left as it is.
    agent = {"id": "ag_1", "instructions": "be brief"}
    assert mine.seal_row("agents", dict(agent)) == agent
