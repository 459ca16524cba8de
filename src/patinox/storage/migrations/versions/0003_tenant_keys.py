"""Wrapped per-tenant DEKs; the crypto-shredding mark on tenants.

``tenant_keys`` holds each tenant's DEKs wrapped by the KEK, one row per version. On
PostgreSQL it is readable only by control-plane transactions (``patinox.scope =
'control'``): tenant stores never read key material directly.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from patinox.storage._schema import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenant_keys",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "version", name=op.f("pk_tenant_keys")),
    )
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("keys_destroyed_at", UTCDateTime(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE tenant_keys ENABLE ROW LEVEL SECURITY")
        op.execute("ALTER TABLE tenant_keys FORCE ROW LEVEL SECURITY")
        op.execute(
            "CREATE POLICY control_only ON tenant_keys "
            "USING (current_setting('patinox.scope', true) = 'control') "
            "WITH CHECK (current_setting('patinox.scope', true) = 'control')"
        )


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("keys_destroyed_at")
    op.drop_table("tenant_keys")
