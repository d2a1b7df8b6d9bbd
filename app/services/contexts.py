"""Contexts: the stored prompts."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Row, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import NotFound, PayloadTooLarge
from app.models import Context
from app.pagination import encode_cursor, paginate

_COLUMNS = (Context.id, Context.content, Context.created_at)


async def create_context(
    session: AsyncSession, content: str, max_bytes: int
) -> Row[uuid.UUID, str, datetime]:
    size = len(content.encode("utf-8"))
    if size > max_bytes:
        raise PayloadTooLarge(
            f"content is {size} bytes; the limit is {max_bytes} bytes",
            detail={"field": "content", "size": size, "limit": max_bytes},
        )
    result = await session.execute(
        insert(Context).values(id=uuid.uuid4(), content=content).returning(*_COLUMNS)
    )
    return result.one()


async def get_context(session: AsyncSession, context_id: uuid.UUID) -> Row[uuid.UUID, str, datetime]:
    row = (await session.execute(select(*_COLUMNS).where(Context.id == context_id))).one_or_none()
    if row is None:
        raise NotFound(f"context {context_id} not found")
    return row


async def list_contexts(
    session: AsyncSession, limit: int, cursor: str | None
) -> tuple[list[Context], str | None]:
    stmt = paginate(select(Context), Context.created_at, Context.id, cursor, limit)
    rows = list(await session.scalars(stmt))
    next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
