"""SQL of the `context` table (stored prompts)."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from app.db import AsyncConnection
from app.repositories.listing import newest_first

_COLUMNS = "id, tenant, content, created_at"

_INSERT = (
    f"INSERT INTO context (id, tenant, content) VALUES (%(id)s, %(tenant)s, %(content)s) RETURNING {_COLUMNS}"
)
# `tenant` NULL: any tenant's (an admin's read).
_GET = (
    f"SELECT {_COLUMNS} FROM context WHERE id = %(id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)"
)


async def insert(conn: AsyncConnection, tenant: str, content: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    params = {"id": uuid.uuid4(), "tenant": tenant, "content": content}
    row = await (await cur.execute(_INSERT, params)).fetchone()
    assert row is not None  # INSERT … RETURNING returns its row
    return row


async def get(conn: AsyncConnection, context_id: uuid.UUID, tenant: str | None) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(_GET, {"id": context_id, "tenant": tenant})).fetchone()


async def page(
    conn: AsyncConnection, *, tenant: str | None, cursor: str | None, limit: int, max_bytes: int
) -> tuple[list[dict[str, Any]], str | None]:
    filters = {"tenant": tenant}
    size = sql.SQL("octet_length(content)")
    return await newest_first(
        conn, "context", sql.SQL(_COLUMNS), size, filters, cursor=cursor, limit=limit, max_bytes=max_bytes
    )
