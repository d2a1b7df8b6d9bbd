"""Results: submitting a job and reading it back."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, literal, select
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Session

from app.db import run_after_commit
from app.errors import InvalidInput, NotFound
from app.models import Context, Result, ResultStatus
from app.pagination import encode_cursor, paginate
from app.schemas import SamplingParams

Enqueue = Callable[[uuid.UUID], None]


@dataclass(frozen=True)
class Submitted:
    id: uuid.UUID
    context_id: uuid.UUID
    model: str
    status: ResultStatus
    created_at: datetime


def submit_job(
    session: Session,
    *,
    model: str,
    context_id: uuid.UUID,
    params: SamplingParams,
    max_tokens_limit: int,
    enqueue: Enqueue,
) -> Submitted:
    """Record a pending result; the job is enqueued only once the row is committed."""
    if params.max_tokens > max_tokens_limit:
        raise InvalidInput(
            f"max_tokens must be at most {max_tokens_limit}, got {params.max_tokens}",
            detail={"field": "max_tokens", "limit": max_tokens_limit},
        )
    result_id = uuid.uuid4()
    # One statement checks the context exists and inserts (no round trip to load the prompt).
    stmt = (
        insert(Result)
        .from_select(
            ["id", "context_id", "model", "params"],
            select(
                literal(result_id, UUID(as_uuid=True)),
                Context.id,
                literal(model),
                literal(params.model_dump(exclude_none=True), JSONB),
            ).where(Context.id == context_id),
        )
        .returning(Result.created_at)
    )
    created_at = session.execute(stmt).scalar_one_or_none()
    if created_at is None:
        raise NotFound(f"context {context_id} not found")
    run_after_commit(session, lambda: enqueue(result_id))
    return Submitted(result_id, context_id, model, ResultStatus.PENDING, created_at)


def get_result(session: Session, result_id: uuid.UUID, *, fresh: bool = False) -> Result:
    result = session.get(Result, result_id, populate_existing=fresh)
    if result is None:
        raise NotFound(f"result {result_id} not found")
    return result


def list_results(
    session: Session,
    *,
    limit: int,
    cursor: str | None,
    status: ResultStatus | None = None,
    model: str | None = None,
    context_id: uuid.UUID | None = None,
) -> tuple[list[Result], str | None]:
    stmt = select(Result)
    if status is not None:
        stmt = stmt.where(Result.status == status.value)
    if model is not None:
        stmt = stmt.where(Result.model == model)
    if context_id is not None:
        stmt = stmt.where(Result.context_id == context_id)
    rows = list(session.scalars(paginate(stmt, Result.created_at, Result.id, cursor, limit)))
    next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
