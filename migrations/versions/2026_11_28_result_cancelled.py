"""result status cancelled

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint(op.f("ck_result_status_valid"), "result", type_="check")
    op.create_check_constraint(
        "status_valid", "result", "status IN ('pending', 'completed', 'failed', 'cancelled')"
    )


def downgrade() -> None:
    # 0003 knows no 'cancelled': such jobs become failed, keeping their error or saying why.
    op.execute(
        "UPDATE result SET status = 'failed', error = COALESCE(error, 'cancelled (downgraded)') "
        "WHERE status = 'cancelled'"
    )
    op.drop_constraint(op.f("ck_result_status_valid"), "result", type_="check")
    op.create_check_constraint("status_valid", "result", "status IN ('pending', 'completed', 'failed')")
