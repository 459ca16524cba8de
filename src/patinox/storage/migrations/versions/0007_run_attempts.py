"""Attempts of queued runs: ``run_attempts``, the attempt of each usage record, and the
usage of the running attempt on its queue entry.

A queued run whose worker died is put back in the queue and executed again (at-least-once
execution). ``run_attempts`` keeps one row per execution (who ran it, when, how it
ended, what it used), beside the run in the tenant's placement, with forced row-level
security on PostgreSQL like every tenant table. ``usage_records.attempt`` says which
execution a record meters (one record per attempt at most). ``run_queue.used_*`` hold the
running attempt's usage not yet spent in the token ledger, written after each model
response, which the reaper charges when it puts a dead worker's run back.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from patinox.storage._schema import UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POLICY = (
    "tenant_id = current_setting('patinox.tenant_id', true) "
    "OR current_setting('patinox.scope', true) = 'control'"
)


def _tokens() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    utc = UTCDateTime
    op.create_table(
        "run_attempts",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=80), nullable=False),
        sa.Column("started_at", utc(), nullable=False),
        sa.Column("ended_at", utc(), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("tool_calls", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id", "run_id"],
            ["runs.tenant_id", "runs.id"],
            name=op.f("fk_run_attempts_tenant_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_run_attempts")),
    )
    op.create_index(
        "uq_run_attempts_tenant_id_run_id_attempt",
        "run_attempts",
        ["tenant_id", "run_id", "attempt"],
        unique=True,
    )
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=True))
    op.create_index(
        "uq_usage_records_tenant_id_run_id_attempt",
        "usage_records",
        ["tenant_id", "run_id", "attempt"],
        unique=True,
    )
    with op.batch_alter_table("run_queue") as batch:
        batch.add_column(sa.Column("used_input_tokens", _tokens(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("used_output_tokens", _tokens(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("used_tool_calls", sa.Integer(), nullable=False, server_default="0"))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE run_attempts ENABLE ROW LEVEL SECURITY")
        op.execute("ALTER TABLE run_attempts FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_isolation ON run_attempts USING ({POLICY}) WITH CHECK ({POLICY})")


def downgrade() -> None:
    with op.batch_alter_table("run_queue") as batch:
        batch.drop_column("used_tool_calls")
        batch.drop_column("used_output_tokens")
        batch.drop_column("used_input_tokens")
    op.drop_index("uq_usage_records_tenant_id_run_id_attempt", table_name="usage_records")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("attempt")
    op.drop_index("uq_run_attempts_tenant_id_run_id_attempt", table_name="run_attempts")
    op.drop_table("run_attempts")
