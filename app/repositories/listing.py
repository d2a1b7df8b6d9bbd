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
    filters: dict[str, Any],
    *,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of rows matching every `column = value` filter (a list: any of its values; None
    values are ignored)."""
    where: list[sql.Composable] = [
        sql.SQL("{} = ANY({})" if isinstance(filters[k], list) else "{} = {}").format(sql.Identifier(k), v)
        for k, v in _given(filters)
    ]
    params: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
    if cursor:
        params["c_created"], params["c_id"] = decode_cursor(cursor)
        where.append(sql.SQL("(created_at, id) < (%(c_created)s, %(c_id)s)"))
    query = sql.SQL(
        "SELECT {columns} FROM {table} {where} ORDER BY created_at DESC, id DESC LIMIT {limit}"
    ).format(
        columns=columns,
        table=sql.Identifier(table),
        where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
        limit=sql.Literal(limit + 1),  # one extra row tells whether a next page exists
    )
    cur = conn.cursor(row_factory=dict_row)
    rows = await (await cur.execute(query, params)).fetchall()
    if len(rows) > limit:
        last = rows[limit - 1]
        return rows[:limit], encode_cursor(last["created_at"], last["id"])
    return rows, None


def _given(filters: dict[str, Any]) -> list[tuple[str, sql.Placeholder]]:
    return [(k, sql.Placeholder(k)) for k, v in filters.items() if v is not None]
