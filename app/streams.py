"""Token streams: the new text of a streamed job, as it is generated, in a Redis stream per result.

The worker appends one entry per piece of new text with the explicit id `0-<n>` (n = 1, 2, ...: the
SSE event id), then an entry with a `done` field once the row is final. Every API process reads the
same stream, so a client can read it from any of them, from the start, or resume after an event id.
A stream is bounded by its job (at most one entry per generated token, plus the end) and expires
`STREAM_TTL_S` after its last entry; the row in Postgres stays the record.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from app.config import Settings

TEXT_FIELD = b"t"
DONE_FIELD = b"done"


def stream_key(queue: str, result_id: uuid.UUID | str) -> str:
    return f"{queue}:tokens:{result_id}"


def entry_id(seq: int) -> str:
    return f"0-{seq}"


def entry_seq(raw_id: bytes) -> int:
    return int(raw_id.split(b"-", 1)[1])


@dataclass(frozen=True)
class Piece:
    seq: int
    text: str


@dataclass(frozen=True)
class Entries:
    pieces: list[Piece]
    done: bool  # the worker wrote its end marker: nothing follows


class TokenStreamReader:
    """The API's side: one client (its own connection pool) per process."""

    def __init__(self, settings: Settings) -> None:
        self._queue = settings.CELERY_QUEUE
        self._redis = aioredis.from_url(settings.REDIS_URL, socket_connect_timeout=1)

    async def exists(self, result_id: uuid.UUID) -> bool:
        return bool(await self._redis.exists(stream_key(self._queue, result_id)))

    async def read(self, result_id: uuid.UUID, after: int, block_ms: int | None) -> Entries:
        """Entries after event `after`; with `block_ms`, waits up to that long for the first one."""
        key = stream_key(self._queue, result_id)
        raw: Any
        if block_ms is None:
            raw = await self._redis.xrange(key, min=f"({entry_id(after)}", max="+")
        else:
            answer: Any = await self._redis.xread({key: entry_id(after)}, block=block_ms)
            raw = answer[0][1] if answer else []  # RESP2: [[key, [(id, fields), ...]]]
        pieces: list[Piece] = []
        done = False
        for raw_id, fields in raw:
            if DONE_FIELD in fields:
                done = True
                break
            pieces.append(Piece(entry_seq(raw_id), fields[TEXT_FIELD].decode("utf-8", errors="replace")))
        return Entries(pieces, done)

    async def close(self) -> None:
        await self._redis.aclose()
