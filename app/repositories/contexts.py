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
# A context a submit is inserting a result for is locked by its key check: skipped, it stays.
_LOCK_UNUSED = f"{_UNUSED} LIMIT %(batch)s FOR UPDATE OF c SKIP LOCKED"
# Its own statement, whose snapshot sees every result committed before the locks were taken.
# The `Idempotency-Key` records that answered with a deleted context go too: a replay creates anew.
_DELETE_LOCKED = """
    WITH gone AS (
        DELETE FROM context AS c
         WHERE c.id = ANY(%(ids)s::uuid[]) AND NOT EXISTS (SELECT 1 FROM result AS r WHERE r.context_id = c.id)
        RETURNING c.id, c.tenant
    ), replays AS (
        DELETE FROM idempotency_key AS i USING gone WHERE i.tenant = gone.tenant AND i.response->>'id' = gone.id::text
    )
    SELECT count(*) FROM gone
"""
# The dry run's count: a result that the purge's first step keeps (its condition, negated) keeps its context.
_UNUSED_AFTER_PURGE = """
    SELECT count(*) FROM context AS c
     WHERE c.created_at < %(before)s AND (%(tenant)s::text IS NULL OR c.tenant = %(tenant)s)
       AND NOT EXISTS (
            SELECT 1 FROM result AS r
             WHERE r.context_id = c.id
               AND NOT (r.status IN ('completed', 'failed', 'cancelled') AND r.created_at < %(before)s
                        AND (%(tenant)s::text IS NULL OR r.tenant = %(tenant)s)))
"""


async def purge_unused(
    conn: AsyncConnection, before: datetime, tenant: str | None, batch: int
) -> tuple[int, int]:
    """Delete up to `batch` contexts created before `before` that no result refers to, in one
    transaction: (candidates taken, contexts deleted). Candidates not deleted got a result meanwhile."""
    async with conn.transaction():
        params = {"before": before, "tenant": tenant, "batch": batch}
        ids = [row[0] for row in await (await conn.execute(_LOCK_UNUSED, params)).fetchall()]
        if not ids:
            return 0, 0
        row = await (await conn.execute(_DELETE_LOCKED, {"ids": ids})).fetchone()
    return len(ids), int(row[0]) if row else 0


async def count_unused_after_purge(conn: AsyncConnection, before: datetime, tenant: str | None) -> int:
    """How many contexts `purge_unused` would delete once the ended results before `before` are gone."""
    row = await (await conn.execute(_UNUSED_AFTER_PURGE, {"before": before, "tenant": tenant})).fetchone()
    return int(row[0]) if row else 0
