"""result indexes on finished_at: exports by the time jobs ended

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_result_finished_at_id", "result", ["finished_at", "id"])
    op.create_index("ix_result_tenant_finished_at_id", "result", ["tenant", "finished_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_result_tenant_finished_at_id", table_name="result")
    op.drop_index("ix_result_finished_at_id", table_name="result")
