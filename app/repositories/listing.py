"""Keyset listings shared by the tables listed newest first on (created_at, id)."""

from __future__ import annotations

from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from app.db import AsyncConnection
from app.pagination import decode_cursor, encode_cursor


async def newest_first(
    conn: AsyncConnection,
    table: str,
    columns: sql.Composable,
    size: sql.Composable,
    filters: dict[str, Any],
    *,
    cursor: str | None,
    limit: int,
    max_bytes: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of rows matching every `column = value` filter (a list: any of its values; None
    values are ignored): at most `limit` rows, and no row once those before it hold `max_bytes`
    (`size`: a row's bytes, from lengths Postgres keeps, so that rows past the bound are never read)."""
    where: list[sql.Composable] = [
        sql.SQL("{} = ANY({})" if isinstance(filters[k], list) else "{} = {}").format(sql.Identifier(k), v)
        for k, v in _given(filters)
    ]
    params: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
    params["max_bytes"] = max_bytes
    if cursor:
        params["c_created"], params["c_id"] = decode_cursor(cursor)
        where.append(sql.SQL("(created_at, id) < (%(c_created)s, %(c_id)s)"))
    query = sql.SQL(_PAGE).format(
        columns=columns,
        size=size,
        table=sql.Identifier(table),
        where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
        limit=sql.Literal(limit + 1),  # one extra row tells whether a next page exists
    )
    cur = conn.cursor(row_factory=dict_row)
    rows = await (await cur.execute(query, params)).fetchall()
    candidates = rows[0].pop("page_candidates") if rows else 0
    for row in rows[1:]:
        del row["page_candidates"]
    if len(rows) > limit:
        rows = rows[:limit]
    elif len(rows) == candidates:
        return rows, None
    last = rows[-1]
    return rows, encode_cursor(last["created_at"], last["id"])


# The page's candidates (keys and sizes only), then the rows of those within the byte bound.
_PAGE = """
    WITH candidates AS (
        SELECT id, created_at, {size} AS bytes FROM {table} {where}
         ORDER BY created_at DESC, id DESC LIMIT {limit}
    ), sized AS (
        SELECT id, count(*) OVER () AS page_candidates,
               COALESCE(sum(bytes) OVER (ORDER BY created_at DESC, id DESC
                                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS bytes_before
          FROM candidates
    )
    SELECT {columns}, sized.page_candidates FROM {table} JOIN sized USING (id)
     WHERE sized.bytes_before < %(max_bytes)s
     ORDER BY created_at DESC, id DESC
"""


def _given(filters: dict[str, Any]) -> list[tuple[str, sql.Placeholder]]:
    return [(k, sql.Placeholder(k)) for k, v in filters.items() if v is not None]
