"""Results: submitting a job and reading it back."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, insert, select
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncSession

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


# The hot paths' statements are built once (Core, bound parameters): building and compiling an
# ORM statement per request cost more CPU than the database round trip itself.
_result = cast(Table, Result.__table__)
_context = cast(Table, Context.__table__)
# One statement checks the context exists and inserts (no round trip to load the prompt).
_SUBMIT = (
    insert(_result)
    .from_select(
        ["id", "context_id", "model", "params"],
        select(
            bindparam("id", type_=UUID(as_uuid=True)),
            _context.c.id,
            bindparam("model", type_=_result.c.model.type),
            bindparam("params", type_=JSONB),
        ).where(_context.c.id == bindparam("context_id", type_=UUID(as_uuid=True))),
    )
    .returning(_result.c.created_at)
)
_GET_RESULT = select(*_result.c).where(_result.c.id == bindparam("id", type_=UUID(as_uuid=True)))


async def submit_job(
    session: AsyncSession,
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
    connection = await session.connection()
    created_at = (
        await connection.execute(
            _SUBMIT,
            {
                "id": result_id,
                "context_id": context_id,
                "model": model,
                "params": params.model_dump(exclude_none=True),
            },
        )
    ).scalar_one_or_none()
    if created_at is None:
        raise NotFound(f"context {context_id} not found")
    run_after_commit(session, lambda: enqueue(result_id))
    return Submitted(result_id, context_id, model, ResultStatus.PENDING, created_at)


async def get_result(session: AsyncSession, result_id: uuid.UUID) -> Row[Any]:
    """The row as it is now (a plain Core read: the long poll reads it more than once)."""
    connection = await session.connection()
    row = (await connection.execute(_GET_RESULT, {"id": result_id})).one_or_none()
    if row is None:
        raise NotFound(f"result {result_id} not found")
    return row


async def list_results(
    session: AsyncSession,
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
    rows = list(await session.scalars(paginate(stmt, Result.created_at, Result.id, cursor, limit)))
    next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
