"""ORM models: `context` (prompts) and `result` (one job per row)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class ResultStatus(enum.StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


TERMINAL_STATUSES = frozenset({ResultStatus.COMPLETED, ResultStatus.FAILED})


class Context(Base):
    __tablename__ = "context"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )

    __table_args__ = (
        # Keyset pagination, newest first.
        Index("ix_context_created_at_id", "created_at", "id"),
    )


class Result(Base):
    __tablename__ = "result"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    context_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("context.id", ondelete="RESTRICT"), nullable=False
    )
    model: Mapped[str] = mapped_column(String(255), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    # Plain text with a CHECK rather than a PG enum: adding `cancelled` later is a one-line migration.
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default=ResultStatus.PENDING.value)
    output: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp(), onupdate=func.now()
    )

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'completed', 'failed')", name="status_valid"),
        # Admin listings: newest first, optionally by status / model / context; keyset on (created_at, id).
        Index("ix_result_created_at_id", "created_at", "id"),
        Index("ix_result_status_created_at_id", "status", "created_at", "id"),
        Index("ix_result_model_created_at_id", "model", "created_at", "id"),
        Index("ix_result_context_id_created_at_id", "context_id", "created_at", "id"),
    )
