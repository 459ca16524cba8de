"""Usage records gain the CPU seconds and peak memory of the run's execution process.

Runs at the ``process``, ``container`` and ``dedicated`` isolation levels execute in a
process of their own, whose CPU time and peak memory the host measures (from the tenant's
cgroups, else from ``/proc``). Both columns are NULL where nothing measured them: runs at
the ``namespace`` level, which share one process, and records written before.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("cpu_seconds", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column(
                "peak_memory_bytes", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("peak_memory_bytes")
        batch.drop_column("cpu_seconds")
