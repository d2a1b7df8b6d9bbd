"""api keys and tenants: tenant on contexts and results, api_key, tenant_limits, idempotency_key

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows go to the `default` tenant; new rows always name theirs.
    for table in ("context", "result"):
        op.add_column(
            table, sa.Column("tenant", sa.String(length=64), server_default="default", nullable=False)
        )
        op.alter_column(table, "tenant", server_default=None)
    op.create_index("ix_context_tenant_created_at_id", "context", ["tenant", "created_at", "id"])
    op.create_index("ix_result_tenant_created_at_id", "result", ["tenant", "created_at", "id"])
    op.create_index(
        "ix_result_tenant_status_created_at_id", "result", ["tenant", "status", "created_at", "id"]
    )
    op.create_table(
        "api_key",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("max_pending", sa.Integer(), nullable=True),
        sa.Column("submit_rate_per_s", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("scope IN ('user', 'admin')", name=op.f("ck_api_key_scope_valid")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("hash", name=op.f("uq_api_key_hash")),
    )
    op.create_index("ix_api_key_created_at_id", "api_key", ["created_at", "id"])
    op.create_table(
        "tenant_limits",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("max_pending", sa.Integer(), nullable=True),
        sa.Column("submit_rate_per_s", sa.Integer(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("tenant", name=op.f("pk_tenant_limits")),
    )
    op.create_table(
        "idempotency_key",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary(length=32), nullable=False),
        sa.Column("status_code", sa.SmallInteger(), nullable=True),
        sa.Column("response", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("tenant", "key", name="pk_idempotency_key"),
    )
    op.create_index("ix_idempotency_key_created_at", "idempotency_key", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_key_created_at", table_name="idempotency_key")
    op.drop_table("idempotency_key")
    op.drop_table("tenant_limits")
    op.drop_index("ix_api_key_created_at_id", table_name="api_key")
    op.drop_table("api_key")
    op.drop_index("ix_result_tenant_status_created_at_id", table_name="result")
    op.drop_index("ix_result_tenant_created_at_id", table_name="result")
    op.drop_index("ix_context_tenant_created_at_id", table_name="context")
    op.drop_column("result", "tenant")
    op.drop_column("context", "tenant")
