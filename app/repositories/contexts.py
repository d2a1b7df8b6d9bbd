"""SQL of the `context` table (stored prompts)."""

from __future__ import annotations

import uuid
from datetime import datetime
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


# Contexts no result refers to (any more), created before the cut: the purge's second step.
_UNUSED = """
    SELECT c.id FROM context AS c
     WHERE c.created_at < %(before)s AND (%(tenant)s::text IS NULL OR c.tenant = %(tenant)s)
       AND NOT EXISTS (SELECT 1 FROM result AS r WHERE r.context_id = c.id)
"""


async def purge_unused(conn: AsyncConnection, before: datetime, tenant: str | None, batch: int) -> int:
    """Delete up to `batch` contexts created before `before` that no result refers to."""
    cur = await conn.execute(
        f"DELETE FROM context WHERE id IN ({_UNUSED} LIMIT %(batch)s)",
        {"before": before, "tenant": tenant, "batch": batch},
    )
    return cur.rowcount


async def count_unused(conn: AsyncConnection, before: datetime, tenant: str | None) -> int:
    row = await (
        await conn.execute(
            f"SELECT count(*) FROM ({_UNUSED}) AS unused", {"before": before, "tenant": tenant}
        )
    ).fetchone()
    return int(row[0]) if row else 0
