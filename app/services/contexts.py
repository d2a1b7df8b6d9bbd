"""Contexts: the stored prompts."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound, PayloadTooLarge
from app.models import Context
from app.pagination import encode_cursor, paginate


def create_context(session: Session, content: str, max_bytes: int) -> Context:
    size = len(content.encode("utf-8"))
    if size > max_bytes:
        raise PayloadTooLarge(
            f"content is {size} bytes; the limit is {max_bytes} bytes",
            detail={"field": "content", "size": size, "limit": max_bytes},
        )
    context = Context(content=content)
    session.add(context)
    session.flush()
    session.refresh(context)  # created_at comes from the server
    return context


def get_context(session: Session, context_id: uuid.UUID) -> Context:
    context = session.get(Context, context_id)
    if context is None:
        raise NotFound(f"context {context_id} not found")
    return context


def list_contexts(session: Session, limit: int, cursor: str | None) -> tuple[list[Context], str | None]:
    stmt = paginate(select(Context), Context.created_at, Context.id, cursor, limit)
    rows = list(session.scalars(stmt))
    next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
