"""Keyset pagination on (created_at, id), newest first, with opaque cursors."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from app.errors import InvalidInput


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_raw, id_raw = base64.urlsafe_b64decode(padded.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created_raw), uuid.UUID(id_raw)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput(
            "invalid cursor: pass the next_cursor of a previous page", detail={"field": "cursor"}
        ) from exc


def paginate(
    stmt: Select[Any],
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[uuid.UUID],
    cursor: str | None,
    limit: int,
) -> Select[Any]:
    """Newest first; rows strictly after the cursor; one extra row tells whether a next page exists."""
    if cursor:
        c_created, c_id = decode_cursor(cursor)
        stmt = stmt.where(or_(created_at < c_created, and_(created_at == c_created, row_id < c_id)))
    return stmt.order_by(created_at.desc(), row_id.desc()).limit(limit + 1)
