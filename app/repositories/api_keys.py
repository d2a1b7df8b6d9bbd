"""SQL of the `api_key` and `tenant_limits` tables."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg.rows import dict_row

from app.db import AsyncConnection

_PUBLIC = (
    "id, tenant, name, scope, prefix, max_pending, submit_rate_per_s, created_at, last_used_at, revoked_at"
)

_INSERT = f"""
    INSERT INTO api_key (id, tenant, name, scope, hash, prefix, max_pending, submit_rate_per_s)
    VALUES (%(id)s, %(tenant)s, %(name)s, %(scope)s, %(hash)s, %(prefix)s, %(max_pending)s, %(submit_rate_per_s)s)
    RETURNING {_PUBLIC}
"""
# The key with its tenant's limits (per-key values win, then the tenant's), in one round trip.
_BY_HASH = """
    SELECT k.id, k.tenant, k.scope, k.hash, k.revoked_at,
           COALESCE(k.max_pending, t.max_pending) AS max_pending,
           COALESCE(k.submit_rate_per_s, t.submit_rate_per_s) AS submit_rate_per_s
      FROM api_key AS k LEFT JOIN tenant_limits AS t ON t.tenant = k.tenant
     WHERE k.hash = %(hash)s
"""
_TENANT_LIMITS = """
    SELECT t.max_pending, t.submit_rate_per_s, t.updated_at
      FROM (SELECT 1) AS one LEFT JOIN tenant_limits AS t ON t.tenant = %(tenant)s
"""
_LIST = f"SELECT {_PUBLIC} FROM api_key ORDER BY created_at DESC, id DESC"
# `before`: revoked by an earlier statement (this one's revocation is stamped with its own now()).
_REVOKE = f"""
    UPDATE api_key SET revoked_at = COALESCE(revoked_at, now()) WHERE id = %(id)s
    RETURNING {_PUBLIC}, revoked_at <> now() AS before
"""
_TOUCH = "UPDATE api_key SET last_used_at = now() WHERE id = ANY(%(ids)s::uuid[])"
_SET_TENANT_LIMITS = """
    INSERT INTO tenant_limits (tenant, max_pending, submit_rate_per_s)
    VALUES (%(tenant)s, %(max_pending)s, %(submit_rate_per_s)s)
    ON CONFLICT (tenant) DO UPDATE
       SET max_pending = EXCLUDED.max_pending, submit_rate_per_s = EXCLUDED.submit_rate_per_s, updated_at = now()
    RETURNING tenant, max_pending, submit_rate_per_s, updated_at
"""


async def insert(conn: AsyncConnection, **values: Any) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    row = await (await cur.execute(_INSERT, {"id": uuid.uuid4(), **values})).fetchone()
    assert row is not None  # INSERT … RETURNING returns its row
    return row


async def by_hash(conn: AsyncConnection, key_hash: bytes) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(_BY_HASH, {"hash": key_hash})).fetchone()


async def tenant_limits(conn: AsyncConnection, tenant: str) -> dict[str, Any]:
    """The tenant's quota overrides and when they were set (each None when not set)."""
    cur = conn.cursor(row_factory=dict_row)
    row = await (await cur.execute(_TENANT_LIMITS, {"tenant": tenant})).fetchone()
    assert row is not None  # one row, whether the tenant has limits or not
    return row


async def all_keys(conn: AsyncConnection) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(_LIST)).fetchall()


async def revoke(conn: AsyncConnection, key_id: uuid.UUID) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(_REVOKE, {"id": key_id})).fetchone()


async def touch(conn: AsyncConnection, key_ids: list[uuid.UUID]) -> None:
    await conn.execute(_TOUCH, {"ids": key_ids})


async def set_tenant_limits(
    conn: AsyncConnection, tenant: str, max_pending: int | None, submit_rate_per_s: int | None
) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    params = {"tenant": tenant, "max_pending": max_pending, "submit_rate_per_s": submit_rate_per_s}
    row = await (await cur.execute(_SET_TENANT_LIMITS, params)).fetchone()
    assert row is not None
    return row
