"""Storage model per tenant; row-level security on PostgreSQL.

Every tenant table gets ``ENABLE`` + ``FORCE ROW LEVEL SECURITY`` and one policy: a row is
visible and writable only when ``tenant_id`` equals the transaction-local setting
``patinox.tenant_id``, or when the transaction declared itself control-plane
(``patinox.scope = 'control'``, used by operator code: key lookup, tenant deletion,
operator views). With neither set, nothing is visible (fail closed). The settings are set
with ``set_config(..., true)`` — transaction-local — never per session.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TENANT_TABLES = ("agents", "runs", "memory", "usage_records", "audit_log", "api_keys")
POLICY = (
    "tenant_id = current_setting('patinox.tenant_id', true) "
    "OR current_setting('patinox.scope', true) = 'control'"
)


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("storage_model", sa.String(10), nullable=False, server_default="pool"))
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TENANT_TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_isolation ON {table} USING ({POLICY}) WITH CHECK ({POLICY})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TENANT_TABLES:
            op.execute(f"DROP POLICY IF EXISTS tenant_isolation ON {table}")
            op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
            op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("storage_model")
