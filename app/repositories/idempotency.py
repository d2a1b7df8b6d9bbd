"""SQL of the `idempotency_key` table: the first answer to a request, per (tenant, key)."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from app.db import AsyncConnection, Connection

# Inside the caller's transaction: the row is claimed (a concurrent duplicate waits on it until this
# transaction ends) unless a live one exists; one older than the retention is taken over.
_CLAIM = """
    INSERT INTO idempotency_key (tenant, key, fingerprint) VALUES (%(tenant)s, %(key)s, %(fingerprint)s)
    ON CONFLICT (tenant, key) DO UPDATE
       SET fingerprint = EXCLUDED.fingerprint, status_code = NULL, response = NULL, created_at = clock_timestamp()
     WHERE idempotency_key.created_at < now() - make_interval(secs => %(retention_s)s)
    RETURNING 1
"""
_GET = """
    SELECT fingerprint, status_code, response FROM idempotency_key WHERE tenant = %(tenant)s AND key = %(key)s
"""
_STORE = """
    UPDATE idempotency_key SET status_code = %(status_code)s, response = %(response)s
     WHERE tenant = %(tenant)s AND key = %(key)s
"""
_FORGET_OLD = "DELETE FROM idempotency_key WHERE created_at < now() - make_interval(secs => %(retention_s)s)"


async def claim(conn: AsyncConnection, tenant: str, key: str, fingerprint: bytes, retention_s: float) -> bool:
    """True when this request is the first (or the earlier one has expired)."""
    params = {"tenant": tenant, "key": key, "fingerprint": fingerprint, "retention_s": retention_s}
    return await (await conn.execute(_CLAIM, params)).fetchone() is not None


async def get(conn: AsyncConnection, tenant: str, key: str) -> tuple[bytes, int | None, Any] | None:
    row = await (await conn.execute(_GET, {"tenant": tenant, "key": key})).fetchone()
    return None if row is None else (bytes(row[0]), row[1], row[2])


async def store(conn: AsyncConnection, tenant: str, key: str, status_code: int, response: Any) -> None:
    params = {"tenant": tenant, "key": key, "status_code": status_code, "response": Jsonb(response)}
    await conn.execute(_STORE, params)


def forget_old(conn: Connection, retention_s: float) -> int:
    """The sweeper's clean-up."""
    return conn.execute(_FORGET_OLD, {"retention_s": retention_s}).rowcount
