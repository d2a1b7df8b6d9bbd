"""The worker's side of token streams (see app/streams.py): appends new text to Redis as it comes.

Lives on the runtime's event loop. The generation hands each piece to its `StreamSink` without
waiting; one flusher sends whatever has gathered, for every job, in one pipeline, so a busy worker
pays one round trip per flush rather than per token, and an idle one sends each piece at once.
Best effort: without Redis the pieces are dropped (the row in Postgres is still written whole).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis

from app.config import Settings
from app.streams import (
    DONE_FIELD,
    TEXT_FIELD,
    Published,
    encode_published,
    entry_id,
    entry_seq,
    pieces_channel,
    stream_key,
)

log = logging.getLogger(__name__)


class StreamSink:
    """One job's stream: the next event id, and what was already published by an earlier attempt."""

    def __init__(
        self, writer: StreamWriter, result_id: uuid.UUID, key: str, next_seq: int, skip_chars: int
    ) -> None:
        self._writer = writer
        self.result_id = str(result_id)
        self.key = key
        self.next_seq = next_seq
        self._skip = skip_chars
        self.pending: list[str] = []
        self.done: str | None = None

    def __call__(self, text: str) -> None:
        if self._skip:  # an earlier attempt already published this much of the text
            cut = min(self._skip, len(text))
            self._skip -= cut
            text = text[cut:]
            if not text:
                return
        self.pending.append(text)
        self._writer.wake(self)

    def finish(self, status: str) -> None:
        self.done = status
        self._writer.wake(self)


class StreamWriter:
    def __init__(self, settings: Settings) -> None:
        self._queue = settings.CELERY_QUEUE
        self._channel = pieces_channel(settings.CELERY_QUEUE)
        self._ttl_s = settings.STREAM_TTL_S
        self._redis = aioredis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
        self._dirty: dict[str, StreamSink] = {}
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())
        self._warned = False

    def first_sink(self, result_id: uuid.UUID) -> StreamSink:
        """A first attempt's stream: nothing was published before, no need to look (any thread)."""
        return StreamSink(self, result_id, stream_key(self._queue, result_id), 1, 0)

    async def open(self, result_id: uuid.UUID, attempt: int) -> StreamSink:
        key = stream_key(self._queue, result_id)
        next_seq, published = 1, 0
        if attempt > 1:  # an earlier attempt may have streamed part of the text: go on after it
            try:
                entries: Any = await self._redis.xrange(key)
                for raw_id, fields in entries:
                    next_seq = entry_seq(raw_id) + 1
                    published += len(fields.get(TEXT_FIELD, b"").decode("utf-8", errors="replace"))
            except (redis.RedisError, OSError) as exc:
                log.warning("result %s: earlier stream unreadable (%s)", result_id, exc)
        return StreamSink(self, result_id, key, next_seq, published)

    def wake(self, sink: StreamSink) -> None:
        self._dirty[sink.key] = sink
        self._wake.set()

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, {}
            try:
                await self._flush(list(dirty.values()))
                self._warned = False
            except (redis.RedisError, OSError) as exc:
                if not self._warned:
                    log.warning("token streams: Redis write failed, pieces dropped (%s)", exc)
                    self._warned = True

    async def _flush(self, sinks: list[StreamSink]) -> None:
        published: list[Published] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            for sink in sinks:
                if sink.pending:
                    text, sink.pending = "".join(sink.pending), []
                    pipe.xadd(sink.key, {TEXT_FIELD: text.encode()}, id=entry_id(sink.next_seq))
                    published.append([sink.result_id, sink.next_seq, text])
                    sink.next_seq += 1
                if sink.done is not None:
                    pipe.xadd(sink.key, {DONE_FIELD: sink.done.encode()}, id=entry_id(sink.next_seq))
                    published.append([sink.result_id, sink.next_seq, None, sink.done])
                    sink.next_seq += 1
                pipe.expire(sink.key, self._ttl_s)
            if published:  # after the appends: a follower that misses this reads them from the stream
                pipe.publish(self._channel, encode_published(published))
            await pipe.execute()

    async def close(self) -> None:
        self._task.cancel()
        await self._redis.aclose()
