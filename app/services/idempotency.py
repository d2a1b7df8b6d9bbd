"""`Idempotency-Key`: the same key with the same request, from the same tenant, within 24 hours,
gets the first answer again and creates nothing; the same key with another request is refused."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from app.auth import Principal
from app.db import AsyncConnection, Database
from app.errors import InvalidInput
from app.repositories import idempotency as repo

RETENTION_S = 24 * 3600.0
MAX_KEY_LENGTH = 255


def fingerprint(*parts: str) -> bytes:
    return hashlib.sha256("\n".join(parts).encode()).digest()


def check_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidInput(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters",
            detail={"field": "header.Idempotency-Key"},
        )
    return key


async def first_answer(
    db: Database,
    principal: Principal,
    key: str,
    request_fingerprint: bytes,
    create: Callable[[AsyncConnection], Awaitable[tuple[int, BaseModel]]],
) -> tuple[int, dict[str, Any], bool]:
    """(status, body, created_now). `create` runs in the same transaction as the key's record, so a
    concurrent duplicate waits for it and then replays its answer: exactly one is created."""
    async with db.connection() as conn, conn.transaction():
        if await repo.claim(conn, principal.tenant, key, request_fingerprint, RETENTION_S):
            status, model = await create(conn)
            body = model.model_dump(mode="json")
            await repo.store(conn, principal.tenant, key, status, body)
            return status, body, True
        stored = await repo.get(conn, principal.tenant, key)
    assert stored is not None  # claimed and answered in one transaction
    stored_fingerprint, stored_status, body = stored
    if stored_fingerprint != request_fingerprint:
        raise InvalidInput(
            f"Idempotency-Key '{key}' was already used with a different request in the last 24 hours; "
            "use a new key for a new request",
            detail={"field": "header.Idempotency-Key", "conflict": "different request"},
        )
    return stored_status or 200, body, False
