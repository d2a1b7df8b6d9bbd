"""result deadline and lease

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("result", sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("result", sa.Column("lease_owner", sa.String(length=128), nullable=True))
    op.add_column("result", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("result", "lease_until")
    op.drop_column("result", "lease_owner")
    op.drop_column("result", "deadline_at")
