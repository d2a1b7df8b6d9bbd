"""Contexts: the stored prompts."""

from __future__ import annotations

import uuid

from app.auth import Principal
from app.db import AsyncConnection, Database
from app.errors import NotFound, PayloadTooLarge
from app.repositories import contexts as repo
from app.schemas import ContextOut, Page


def check_size(content: str, max_bytes: int) -> None:
    size = len(content.encode("utf-8"))
    if size > max_bytes:
        raise PayloadTooLarge(
            f"content is {size} bytes; the limit is {max_bytes} bytes",
            detail={"field": "content", "size": size, "limit": max_bytes},
        )


async def insert(conn: AsyncConnection, principal: Principal, content: str) -> ContextOut:
    return ContextOut.model_validate(await repo.insert(conn, principal.tenant, content))


async def create_context(db: Database, principal: Principal, content: str) -> ContextOut:
    async with db.connection() as conn:
        return await insert(conn, principal, content)


async def get_context(db: Database, principal: Principal, context_id: uuid.UUID) -> ContextOut:
    async with db.connection() as conn:
        row = await repo.get(conn, context_id, principal.tenant_filter)
    if row is None:  # another tenant's context is as unknown as a missing one
        raise NotFound(f"context {context_id} not found")
    return ContextOut.model_validate(row)


async def list_contexts(
    db: Database,
    principal: Principal,
    *,
    tenant: str | None,
    limit: int,
    cursor: str | None,
    max_bytes: int,
) -> Page[ContextOut]:
    async with db.connection() as conn:
        rows, next_cursor = await repo.page(
            conn, tenant=principal.listing_tenant(tenant), cursor=cursor, limit=limit, max_bytes=max_bytes
        )
    return Page[ContextOut](items=[ContextOut.model_validate(r) for r in rows], next_cursor=next_cursor)
