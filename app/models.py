"""The schema (for Alembic): `context` (prompts), `result` (one job per row), `api_key`,
`tenant_limits` and `idempotency_key`. The SQL that reads and writes them is in app/repositories/."""

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
    LargeBinary,
    PrimaryKeyConstraint,
    SmallInteger,
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
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({ResultStatus.COMPLETED, ResultStatus.FAILED, ResultStatus.CANCELLED})


DEFAULT_TENANT = "default"


class Context(Base):
    __tablename__ = "context"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )

    __table_args__ = (
        # Keyset pagination, newest first: across tenants (admin) and per tenant.
        Index("ix_context_created_at_id", "created_at", "id"),
        Index("ix_context_tenant_created_at_id", "tenant", "created_at", "id"),
    )


class Result(Base):
    __tablename__ = "result"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64), nullable=False)
    context_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("context.id", ondelete="RESTRICT"), nullable=False
    )
    model: Mapped[str] = mapped_column(String(255), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    # The prompt as sent to the model when it is not the context's content (a rendered chat template).
    prompt: Mapped[str | None] = mapped_column(Text)
    # Plain text with a CHECK rather than a PG enum: adding `cancelled` later is a one-line migration.
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default=ResultStatus.PENDING.value)
    output: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # The job's own deadline (`timeout_s` at submit); past it the job ends `cancelled`.
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Which worker runs the job and until when it holds it (renewed by the worker's heartbeat).
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp(), onupdate=func.now()
    )

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'completed', 'failed', 'cancelled')", name="status_valid"),
        # Admin listings: newest first, optionally by status / model / context; keyset on (created_at, id).
        Index("ix_result_created_at_id", "created_at", "id"),
        Index("ix_result_status_created_at_id", "status", "created_at", "id"),
        Index("ix_result_model_created_at_id", "model", "created_at", "id"),
        Index("ix_result_context_id_created_at_id", "context_id", "created_at", "id"),
        # Per tenant: listings, and the count of pending jobs the quota checks.
        Index("ix_result_tenant_created_at_id", "tenant", "created_at", "id"),
        Index("ix_result_tenant_status_created_at_id", "tenant", "status", "created_at", "id"),
        # Exports by the time jobs ended (`GET /results/export?by=finished_at`), all tenants or one.
        Index("ix_result_finished_at_id", "finished_at", "id"),
        Index("ix_result_tenant_finished_at_id", "tenant", "finished_at", "id"),
    )


class ApiKey(Base):
    """A key is shown once; only its SHA-256 is kept (keys are 256 random bits: no salt needed)."""

    __tablename__ = "api_key"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    scope: Mapped[str] = mapped_column(String(16), nullable=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False, unique=True)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    # Per-key overrides of the tenant's (or the settings') limits; NULL: inherit.
    max_pending: Mapped[int | None] = mapped_column(Integer)
    submit_rate_per_s: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("scope IN ('user', 'admin')", name="scope_valid"),
        Index("ix_api_key_created_at_id", "created_at", "id"),
    )


class TenantLimits(Base):
    """Per-tenant overrides of the settings' quotas; NULL: the setting."""

    __tablename__ = "tenant_limits"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    max_pending: Mapped[int | None] = mapped_column(Integer)
    submit_rate_per_s: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp(), onupdate=func.now()
    )


class IdempotencyKey(Base):
    """The first answer to a request sent with `Idempotency-Key`, replayed for 24 hours."""

    __tablename__ = "idempotency_key"

    tenant: Mapped[str] = mapped_column(String(64), nullable=False)
    key: Mapped[str] = mapped_column(String(255), nullable=False)
    # SHA-256 of method, path and body: the same key with another request is a conflict.
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )

    __table_args__ = (
        PrimaryKeyConstraint("tenant", "key", name="pk_idempotency_key"),
        Index("ix_idempotency_key_created_at", "created_at"),
    )
