"""Contexts: the stored prompts."""

from __future__ import annotations

import uuid

from app.db import Database
from app.errors import NotFound, PayloadTooLarge
from app.repositories import contexts as repo
from app.schemas import ContextOut, Page


async def create_context(db: Database, content: str, max_bytes: int) -> ContextOut:
    size = len(content.encode("utf-8"))
    if size > max_bytes:
        raise PayloadTooLarge(
            f"content is {size} bytes; the limit is {max_bytes} bytes",
            detail={"field": "content", "size": size, "limit": max_bytes},
        )
    async with db.connection() as conn:
        return ContextOut.model_validate(await repo.insert(conn, content))


async def get_context(db: Database, context_id: uuid.UUID) -> ContextOut:
    async with db.connection() as conn:
        row = await repo.get(conn, context_id)
    if row is None:
        raise NotFound(f"context {context_id} not found")
    return ContextOut.model_validate(row)


async def list_contexts(db: Database, *, limit: int, cursor: str | None) -> Page[ContextOut]:
    async with db.connection() as conn:
        rows, next_cursor = await repo.page(conn, cursor=cursor, limit=limit)
    return Page[ContextOut](items=[ContextOut.model_validate(r) for r in rows], next_cursor=next_cursor)
