"""The worker's side of token streams (see app/streams.py): appends new text to Redis as it comes.

Lives on the runtime's event loop. The generation hands each piece to its `StreamSink` without
waiting; one flusher sends whatever has gathered, for every job, in one pipeline, so a busy worker
pays one round trip per flush rather than per token, and an idle one sends each piece at once.
Without Redis the pieces wait, with their event ids, and go out once it answers: a running job's
until its end, an ended job's for KEEP_ENDED_S more (the row in Postgres is still written whole).
A job that runs again after streaming part of its text (its worker died, Triton failed) opens its
stream with a restart marker: the new generation need not repeat the old one, so readers are told to
drop the text before it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis

from app.config import Settings
from app.redis_clients import retry_once
from app.streams import (
    DONE_FIELD,
    RESTART_FIELD,
    TEXT_FIELD,
    Published,
    encode_published,
    entry_id,
    entry_seq,
    pieces_channel,
    stream_key,
)

log = logging.getLogger(__name__)

RETRY_S = 1.0  # between writes while Redis fails them
KEEP_ENDED_S = 60.0  # bounds what an outage holds: ended jobs' pieces are dropped after this


class StreamSink:
    """One job's stream: the next event id, and whether it opens with a restart marker."""

    def __init__(
        self, writer: StreamWriter, result_id: uuid.UUID, key: str, next_seq: int, restart: bool
    ) -> None:
        self._writer = writer
        self.result_id = str(result_id)
        self.key = key
        self.next_seq = next_seq
        self.restart = restart  # an earlier run streamed text: the next write starts with the marker
        self.pending: list[str] = []  # texts not known to be appended yet, an event each
        self.unanswered = 0  # how many of the first pending texts a write sent, unanswered yet
        self.done: str | None = None
        self.done_sent = False
        self.ended_at = 0.0

    def __call__(self, text: str) -> None:
        self.pending.append(text)
        self._writer.wake(self)

    def finish(self, status: str) -> None:
        self.done = status
        self.ended_at = time.monotonic()
        self._writer.wake(self)

    def texts(self) -> list[str]:
        """The texts to append, an event each. A text a failed write sent keeps its event id, so
        that sent again it is refused as a duplicate if it was appended after all."""
        if len(self.pending) > self.unanswered + 1:
            self.pending[self.unanswered :] = ["".join(self.pending[self.unanswered :])]
        self.unanswered = len(self.pending)
        return list(self.pending)

    def written(self, restarted: bool, count: int, done: bool) -> None:
        """The last write appended the restart marker if `restarted`, the first `count` pending texts,
        and the end marker if `done`."""
        del self.pending[:count]
        self.next_seq += int(restarted) + count + int(done)
        self.restart = self.restart and not restarted
        self.unanswered = 0
        self.done_sent = self.done_sent or done


class StreamWriter:
    def __init__(self, settings: Settings) -> None:
        self._queue = settings.CELERY_QUEUE
        self._channel = pieces_channel(settings.CELERY_QUEUE)
        self._ttl_s = settings.STREAM_TTL_S
        self._redis = aioredis.from_url(
            settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=5, retry=retry_once()
        )
        self._dirty: dict[str, StreamSink] = {}
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())
        self._warned = False

    def first_sink(self, result_id: uuid.UUID) -> StreamSink:
        """A first run's stream: nothing was published before, no need to look (any thread)."""
        return StreamSink(self, result_id, stream_key(self._queue, result_id), 1, False)

    async def open(self, result_id: uuid.UUID) -> StreamSink:
        """The stream of a job that ran before: it goes on after what is there, with a restart
        marker if an earlier run streamed text since the last one."""
        key = stream_key(self._queue, result_id)
        next_seq, restart = 1, False
        try:
            entries: Any = await self._redis.xrange(key)
            for raw_id, fields in entries:
                next_seq = entry_seq(raw_id) + 1
                restart = TEXT_FIELD in fields or (restart and RESTART_FIELD not in fields)
        except (redis.RedisError, OSError) as exc:
            # Unknown: a marker costs a reader nothing, a missing one leaves it the old text.
            log.warning("result %s: earlier stream unreadable (%s)", result_id, exc)
            restart = True
        return StreamSink(self, result_id, key, next_seq, restart)

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
                    log.warning("token streams: Redis write failed, pieces kept for a retry (%s)", exc)
                    self._warned = True
                self._keep(dirty)
                await asyncio.sleep(RETRY_S)

    def _keep(self, failed: dict[str, StreamSink]) -> None:
        """The sinks of a failed write, for the next one; an ended job's only for KEEP_ENDED_S."""
        give_up = time.monotonic() - KEEP_ENDED_S
        for key, sink in failed.items():
            if sink.done is not None and sink.ended_at < give_up:
                log.warning("result %s: Redis still failing, unsent stream pieces dropped", sink.result_id)
            else:
                self._dirty.setdefault(key, sink)
        if self._dirty:
            self._wake.set()

    async def _flush(self, sinks: list[StreamSink]) -> None:
        published: list[Published] = []
        sent: list[tuple[StreamSink, bool, int, bool]] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            for sink in sinks:
                seq, texts, restarted = sink.next_seq, sink.texts(), sink.restart
                if restarted:  # not published: a follower sees the gap and reads it from the stream
                    pipe.xadd(sink.key, {RESTART_FIELD: b"1"}, id=entry_id(seq))
                    seq += 1
                for text in texts:
                    pipe.xadd(sink.key, {TEXT_FIELD: text.encode()}, id=entry_id(seq))
                    published.append([sink.result_id, seq, text])
                    seq += 1
                end = None if sink.done_sent else sink.done
                if end is not None:
                    pipe.xadd(sink.key, {DONE_FIELD: end.encode()}, id=entry_id(seq))
                    published.append([sink.result_id, seq, None, end])
                pipe.expire(sink.key, self._ttl_s)
                sent.append((sink, restarted, len(texts), end is not None))
            if published:  # after the appends: a follower that misses this reads them from the stream
                pipe.publish(self._channel, encode_published(published))
            answers = await pipe.execute(raise_on_error=False)
        for answer in answers:
            if isinstance(answer, redis.ResponseError) and not _appended_before(answer):
                raise answer
        for sink, restarted, count, done in sent:  # pieces that came meanwhile wait for the next flush
            sink.written(restarted, count, done)

    async def close(self) -> None:
        self._task.cancel()
        await self._redis.aclose()


def _appended_before(error: redis.ResponseError) -> bool:
    """An XADD refused because its event id is taken: by this text, from a write whose answer was lost."""
    return "equal or smaller than the target stream top item" in str(error)
