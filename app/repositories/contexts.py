"""SQL of the `context` table (stored prompts)."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from app.db import AsyncConnection
from app.repositories.listing import newest_first

_COLUMNS = "id, content, created_at"

_INSERT = f"INSERT INTO context (id, content) VALUES (%(id)s, %(content)s) RETURNING {_COLUMNS}"
_GET = f"SELECT {_COLUMNS} FROM context WHERE id = %(id)s"


async def insert(conn: AsyncConnection, content: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    row = await (await cur.execute(_INSERT, {"id": uuid.uuid4(), "content": content})).fetchone()
    assert row is not None  # INSERT … RETURNING returns its row
    return row


async def get(conn: AsyncConnection, context_id: uuid.UUID) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(_GET, {"id": context_id})).fetchone()


async def page(
    conn: AsyncConnection, *, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    return await newest_first(conn, "context", sql.SQL(_COLUMNS), {}, cursor=cursor, limit=limit)
