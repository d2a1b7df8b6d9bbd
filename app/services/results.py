"""Results: submitting a job and reading it back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import cast

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import ValidationError
from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Connect
from app.errors import InvalidInput, NotFound
from app.models import Context, Result, ResultStatus
from app.notify import ResultWaiter
from app.pagination import encode_cursor, paginate
from app.schemas import ResultOut, SamplingParams, SendAccepted

log = logging.getLogger(__name__)

Enqueue = Callable[[uuid.UUID], None]


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
# They run on psycopg directly (see app.db.make_statement_pool): compiled once to its SQL.
_PSYCOPG = psycopg_dialect()  # type: ignore[no-untyped-call]
_SUBMIT_SQL = str(_SUBMIT.compile(dialect=_PSYCOPG))
_GET_RESULT_SQL = str(_GET_RESULT.compile(dialect=_PSYCOPG))


async def submit(
    connect: Connect,
    enqueue: Enqueue,
    *,
    model: str,
    context_id: uuid.UUID,
    params: SamplingParams,
    max_tokens_limit: int,
) -> SendAccepted:
    """Record a pending result, then ring the doorbell: only once the row is committed."""
    if params.max_tokens > max_tokens_limit:
        raise InvalidInput(
            f"max_tokens must be at most {max_tokens_limit}, got {params.max_tokens}",
            detail={"field": "max_tokens", "limit": max_tokens_limit},
        )
    result_id = uuid.uuid4()
    values = {
        "id": result_id,
        "context_id": context_id,
        "model": model,
        "params": Jsonb(params.model_dump(exclude_none=True)),
    }
    async with connect() as connection:
        inserted = await (await connection.execute(_SUBMIT_SQL, values)).fetchone()
    if inserted is None:
        raise NotFound(f"context {context_id} not found")
    enqueue(result_id)  # the block above has committed the row: the worker can see it
    url = f"/results/{result_id}"
    return SendAccepted(
        result_id=result_id,
        status=ResultStatus.PENDING,
        model=model,
        context_id=context_id,
        created_at=inserted[0],
        url=url,
    )


async def read(connect: Connect, result_id: uuid.UUID) -> ResultOut:
    """The result as it is now (one Core read; no connection is held afterwards)."""
    async with connect() as connection:
        cursor = connection.cursor(row_factory=dict_row)
        row = await (await cursor.execute(_GET_RESULT_SQL, {"id": result_id})).fetchone()
    if row is None:
        raise NotFound(f"result {result_id} not found")
    return ResultOut.model_validate(row)


async def poll(connect: Connect, waiter: ResultWaiter, result_id: uuid.UUID, wait_s: float) -> ResultOut:
    """The result now, or with `wait_s` > 0 as soon as it is final (at most `wait_s` later)."""
    if wait_s <= 0:
        return await read(connect, result_id)
    # Watch before reading, so that a notice sent between the read and the wait is not missed.
    async with waiter.watch(result_id) as finished:
        result = await read(connect, result_id)
        if result.status != ResultStatus.PENDING:
            return result
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished, wait_s)
    row_json = finished.result() if finished.done() and not finished.cancelled() else None
    if row_json is not None:
        try:
            final = ResultOut.model_validate_json(row_json)
            if final.id == result_id:
                return final
        except ValidationError:
            pass
        log.warning("result %s: unreadable completion notice, reading the database", result_id)
    return await read(connect, result_id)


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
