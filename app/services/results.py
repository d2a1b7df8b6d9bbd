"""Results: submitting a job and reading it back."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import run_after_commit
from app.errors import InvalidInput, NotFound
from app.models import Result, ResultStatus
from app.pagination import encode_cursor, paginate
from app.schemas import SamplingParams
from app.services.contexts import get_context

Enqueue = Callable[[uuid.UUID], None]


def submit_job(
    session: Session,
    *,
    model: str,
    context_id: uuid.UUID,
    params: SamplingParams,
    max_tokens_limit: int,
    enqueue: Enqueue,
) -> Result:
    """Record a pending result; the job is enqueued only once the row is committed."""
    get_context(session, context_id)
    if params.max_tokens > max_tokens_limit:
        raise InvalidInput(
            f"max_tokens must be at most {max_tokens_limit}, got {params.max_tokens}",
            detail={"field": "max_tokens", "limit": max_tokens_limit},
        )
    result = Result(
        context_id=context_id,
        model=model,
        params=params.model_dump(exclude_none=True),
        status=ResultStatus.PENDING.value,
    )
    session.add(result)
    session.flush()
    session.refresh(result)
    result_id = result.id
    run_after_commit(session, lambda: enqueue(result_id))
    return result


def get_result(session: Session, result_id: uuid.UUID) -> Result:
    result = session.get(Result, result_id)
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
