"""Token streams: the new text of a streamed job, as it is generated, in a Redis stream per result.

The worker appends one entry per piece of new text with the explicit id `0-<n>` (n = 1, 2, ...: the
SSE event id), then an entry with a `done` field once the row is final. A job run again after part
of its text was streamed goes on with a `restart` entry: the text before it is void. Every API process reads the
same stream, so a client can read it from any of them, from the start, or resume after an event id.
A stream is bounded by its job (at most one entry per generated token, plus the end) and expires
`STREAM_TTL_S` after its last entry; the row in Postgres stays the record.

Live pieces also travel on a channel: each worker flush publishes what it appended, for every job,
in one message. An API process that has clients following streams subscribes to it and hands each
client its pieces, instead of one blocking read per client per piece; the stream itself serves the
catch-up (a late start, a resume, a gap after a lost message).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from app import background
from app.config import Settings
from app.redis_clients import async_client
from app.subscription import subscribe_forever

log = logging.getLogger(__name__)

TEXT_FIELD = b"t"
DONE_FIELD = b"done"
RESTART_FIELD = b"restart"


def stream_key(queue: str, result_id: uuid.UUID | str) -> str:
    return f"{queue}:tokens:{result_id}"


def entry_id(seq: int) -> str:
    return f"0-{seq}"


def entry_seq(raw_id: bytes) -> int:
    return int(raw_id.split(b"-", 1)[1])


def pieces_channel(queue: str) -> str:
    return f"{queue}:tokens"


# A published piece: [result id, event seq, text], or [result id, event seq, null, end status].
Published = list[Any]


def encode_published(pieces: list[Published]) -> bytes:
    return json.dumps(pieces, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Piece:
    seq: int
    text: str


@dataclass(frozen=True)
class Restart:
    """The job runs again from the start: the text before event `seq` is void."""

    seq: int


@dataclass(frozen=True)
class Entries:
    pieces: list[Piece]  # those after the last restart marker read, if any
    done_seq: int | None  # the event id of the worker's end marker, when read: nothing follows it
    restart_seq: int | None = None  # the event id of the last restart marker read


@dataclass(eq=False)
class Follower:
    """One client's live pieces, as the channel brings them (`seq`, `text`; `text` None: the end)."""

    queued: list[tuple[int, str | None]] = field(default_factory=list)
    _wakeup: asyncio.Future[None] | None = None

    def push(self, seq: int, text: str | None) -> None:
        self.queued.append((seq, text))
        self.wake()

    def wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until something is queued or `wake()` is called (at most `timeout_s`)."""
        if self.queued:
            return
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait((self._wakeup,), timeout=timeout_s)
        finally:
            self._wakeup = None

    def take(self) -> list[tuple[int, str | None]]:
        taken, self.queued = self.queued, []
        return taken


class TokenStreamReader:
    """The API's side: one client (its own connection pool) per process, and one subscription to
    the pieces channel, opened when a client first follows a stream."""

    def __init__(self, settings: Settings) -> None:
        self._queue = settings.CELERY_QUEUE
        self._redis_url = settings.REDIS_URL
        self._redis = async_client(settings.REDIS_URL, socket_connect_timeout=1)
        self._followers: dict[str, set[Follower]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def follow(self, result_id: uuid.UUID) -> AsyncIterator[Follower]:
        """Live pieces of the job from now on: read the stream for what came before."""
        if self._task is None or self._task.done():
            self._subscribed = asyncio.Event()
            self._task = asyncio.create_task(self._listen())
        # Briefly: without the subscription, the follower reads the stream when it is quiet.
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), 1.0)
        key = str(result_id)
        follower = Follower()
        self._followers.setdefault(key, set()).add(follower)
        try:
            yield follower
        finally:
            followers = self._followers.get(key)
            if followers is not None:
                followers.discard(follower)
                if not followers:
                    del self._followers[key]

    async def _listen(self) -> None:
        await subscribe_forever(
            self._redis_url,
            pieces_channel(self._queue),
            "token streams",
            self._subscribed,
            self._dispatch,
            self._lost,
        )

    def _lost(self) -> None:
        for followers in self._followers.values():  # pieces may be missed: read the streams
            for follower in followers:
                follower.wake()

    def _dispatch(self, data: bytes) -> None:
        try:
            pieces = json.loads(data)
        except ValueError:
            log.warning("token streams: unreadable message on the pieces channel")
            return
        for piece in pieces:
            followers = self._followers.get(piece[0])
            if followers:
                for follower in followers:
                    follower.push(piece[1], piece[2])

    async def last(self, result_id: uuid.UUID) -> Entries | None:
        """The stream's last entry (None: no stream): a piece, or the end marker (`done_seq`)."""
        raw: Any = await self._redis.xrevrange(stream_key(self._queue, result_id), count=1)
        return _entries(raw) if raw else None

    async def read(self, result_id: uuid.UUID, after: int, block_ms: int | None) -> Entries:
        """Entries after event `after`; with `block_ms`, waits up to that long for the first one."""
        key = stream_key(self._queue, result_id)
        raw: Any
        if block_ms is None:
            raw = await self._redis.xrange(key, min=f"({entry_id(after)}", max="+")
        else:
            answer: Any = await self._redis.xread({key: entry_id(after)}, block=block_ms)
            raw = answer[0][1] if answer else []  # RESP2: [[key, [(id, fields), ...]]]
        return _entries(raw)

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None
        await self._redis.aclose()


def _entries(raw: Any) -> Entries:
    pieces: list[Piece] = []
    restart_seq: int | None = None
    for raw_id, fields in raw:
        if DONE_FIELD in fields:
            return Entries(pieces, entry_seq(raw_id), restart_seq)
        if RESTART_FIELD in fields:
            pieces, restart_seq = [], entry_seq(raw_id)
            continue
        pieces.append(Piece(entry_seq(raw_id), fields[TEXT_FIELD].decode("utf-8", errors="replace")))
    return Entries(pieces, None, restart_seq)
