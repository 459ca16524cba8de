"""``run_queue.reserved_tokens`` as a 64-bit integer on PostgreSQL.

A run's worst-case reservation is (tool calls + 1) x prompt words + tool calls x 64 +
output tokens; with the largest allowed prompt (1,000,000 characters) and tool-call
limit (10,000) it passes 2**31, which a 32-bit column refused (422 for that async run).
SQLite's INTEGER is 64-bit already.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "run_queue",
            "reserved_tokens",
            type_=sa.BigInteger(),
            existing_type=sa.Integer(),
            existing_nullable=False,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "run_queue",
            "reserved_tokens",
            type_=sa.Integer(),
            existing_type=sa.BigInteger(),
            existing_nullable=False,
        )
