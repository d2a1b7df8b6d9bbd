"""Completion notices, so that a client can wait for a result instead of polling it.

The worker publishes a result's id on a Redis channel once the result is final, followed by the
row as the API renders it (`ResultOut` JSON) when it has it: that row was returned by the
committed statement that made the result final, and a final row never changes again, so a waiter
answers with it instead of reading Postgres once more (one statement and one pool checkout less
per job). Each API process keeps one subscription and wakes the requests waiting on that id.
Notices are only a hint: a notice without the row (the sweeper's, or one too large) makes the
waiter re-read Postgres, and a lost notice costs at most the wait timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from functools import lru_cache

import redis

from app import background
from app.config import Settings
from app.redis_clients import async_client
from app.subscription import subscribe_forever

log = logging.getLogger(__name__)


def done_channel(settings: Settings) -> str:
    return f"{settings.CELERY_QUEUE}:done"


def cancel_channel(settings: Settings) -> str:
    """Where the API tells every worker that a job was cancelled (the one running it aborts it)."""
    return f"{settings.CELERY_QUEUE}:cancel"


class CancelNotices:
    """The API's side: a cancelled job's final row to its waiters, its id to the workers."""

    def __init__(self, settings: Settings) -> None:
        self._redis = async_client(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
        self._done = done_channel(settings)
        self._cancel = cancel_channel(settings)

    async def cancelled(self, result_id: uuid.UUID, row_json: bytes | None) -> None:
        """The cancel to the workers and, unless `row_json` is None (see `ended`), the row to its
        waiters. Best effort: without Redis a running generation goes on, and its outcome is dropped
        (the row is already final)."""
        messages = [(self._cancel, str(result_id).encode())]
        if row_json is not None:
            messages.append((self._done, notice(result_id, row_json)))
        await self._publish(result_id, messages)

    async def ended(self, result_id: uuid.UUID, row_json: bytes) -> None:
        """A cancelled job's final row to its waiters, once it is the one to keep."""
        await self._publish(result_id, [(self._done, notice(result_id, row_json))])

    async def _publish(self, result_id: uuid.UUID, messages: list[tuple[str, bytes]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for channel, message in messages:
                    pipe.publish(channel, message)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("result %s: cancel notice not published (%s)", result_id, exc)

    async def close(self) -> None:
        await self._redis.aclose()


@lru_cache
def _publisher(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


# A notice carries the row only up to this size: every API process receives every notice.
MAX_NOTICE_ROW_BYTES = 64 * 1024


def notice(result_id: uuid.UUID, row_json: bytes | None = None) -> bytes:
    """`<id>` or `<id>\n<ResultOut JSON>`."""
    head = str(result_id).encode()
    if row_json is None or len(row_json) > MAX_NOTICE_ROW_BYTES:
        return head
    return head + b"\n" + row_json


def parse_notice(data: bytes) -> tuple[str, bytes | None]:
    key, sep, row_json = data.partition(b"\n")
    return key.decode(), (row_json if sep and row_json else None)


def publish_done(settings: Settings, notices: list[bytes] | list[uuid.UUID]) -> None:
    """Best effort: a failure only means waiters notice at their timeout. Takes ids or `notice()`s."""
    if not notices:
        return
    messages = [n if isinstance(n, bytes) else notice(n) for n in notices]
    try:
        client = _publisher(settings.REDIS_URL)
        channel = done_channel(settings)
        if len(messages) == 1:
            client.publish(channel, messages[0])
        else:
            pipe = client.pipeline(transaction=False)
            for message in messages:
                pipe.publish(channel, message)
            pipe.execute()
    except redis.RedisError:
        log.warning("could not publish completion of %d result(s)", len(messages), exc_info=True)


# A purge's notice (an older process takes it for an unknown id): API processes forget the rows they keep.
PURGED = "purged"


def purge_notice(before: datetime) -> bytes:
    return PURGED.encode() + b"\n" + before.isoformat().encode()


def publish_purge(settings: Settings, before: datetime) -> str | None:
    """Tell every API process that the results created before `before` may be gone; None when
    told, else why not (their kept rows then expire within RECENT_TTL_S)."""
    try:
        _publisher(settings.REDIS_URL).publish(done_channel(settings), purge_notice(before))
    except redis.RedisError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def publish_cancels(settings: Settings, result_ids: list[uuid.UUID]) -> None:
    """Tell every worker to abort these jobs (ended by the sweeper); best effort, as for the API's."""
    if not result_ids:
        return
    try:
        pipe = _publisher(settings.REDIS_URL).pipeline(transaction=False)
        for result_id in result_ids:
            pipe.publish(cancel_channel(settings), str(result_id))
        pipe.execute()
    except redis.RedisError:
        log.warning("could not publish the cancel of %d result(s)", len(result_ids), exc_info=True)


# What the notices teach each API process, so that most polls need no read of Postgres: the final
# rows of recently finished jobs, and which jobs it created that have not finished yet.
RECENT_ROWS = 8192
RECENT_BYTES = 32 * 1024 * 1024
# Kept no longer: a purge whose notice this process missed serves a deleted row at most this long.
RECENT_TTL_S = 60.0
CREATED_JOBS = 65536

# `known()`: this process created the job, under this subscription, and no notice has come for it.
PENDING = b""


class ResultWaiter:
    """One Redis subscription per API process, fanned out to the requests that wait.

    It also remembers what the notices say (`known`). A job created here while subscribed is
    pending until its notice comes, since every job's end is published and this process receives
    every notice; a lost subscription forgets those jobs (notices may have been missed meanwhile)."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self._waiters: dict[str, set[asyncio.Future[bytes | None]]] = {}
        self.stopping = False
        self._task: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        # id -> (final row as ResultOut JSON, when it came on the monotonic clock), oldest first
        self._recent: dict[str, tuple[bytes, float]] = {}
        self._recent_bytes = 0
        self._purged_before: datetime | None = None  # the latest purge's cut: older rows are not kept
        self._created: dict[str, str] = {}  # id -> tenant: created here, no notice seen yet

    def created(self, result_id: uuid.UUID, tenant: str) -> None:
        """A job this process has just committed and not yet enqueued (no notice can precede this)."""
        if self._subscribed is None or not self._subscribed.is_set():
            return  # notices may be missed: its polls read Postgres
        if len(self._created) >= CREATED_JOBS:  # jobs whose notice was lost: forget the oldest
            del self._created[next(iter(self._created))]
        self._created[str(result_id)] = tenant

    def known(self, result_id: uuid.UUID, tenant: str | None) -> bytes | None:
        """The job's final row if a notice brought it, PENDING if it is a job created here that has
        not ended, None if only Postgres can say. `tenant`: whose it must be (None: anyone's)."""
        key = str(result_id)
        kept = self._recent.get(key)
        row = None
        if kept is not None:
            row, came = kept
            if time.monotonic() - came > RECENT_TTL_S:
                self._drop(key)
                row = None
        if row is not None:
            if tenant is None or row.startswith(
                b'{"id":"%s","tenant":"%s",' % (key.encode(), tenant.encode())
            ):
                return row
            return None  # another tenant's: Postgres answers (404), as for any id
        if key in self._created and (tenant is None or self._created[key] == tenant):
            return PENDING
        return None

    def _drop(self, key: str) -> None:
        old = self._recent.pop(key, None)
        if old is not None:
            self._recent_bytes -= len(old[0])

    def _remember(self, key: str, row_json: bytes | None) -> None:
        self._created.pop(key, None)
        self._drop(key)
        if row_json is None or not row_json.startswith(b'{"id":"%s","tenant":"' % key.encode()):
            return  # a notice without the row (the sweeper's): polls read Postgres
        if self._purged_before is not None and self._created_before(row_json, self._purged_before):
            return  # its notice came after a purge that may have deleted it
        self._recent[key] = (row_json, time.monotonic())
        self._recent_bytes += len(row_json)
        while len(self._recent) > RECENT_ROWS or self._recent_bytes > RECENT_BYTES:
            self._drop(next(iter(self._recent)))

    @staticmethod
    def _created_before(row_json: bytes, cut: datetime) -> bool:
        """Whether the row was created before `cut` (unreadable: taken as yes). Its last
        `"created_at":"` is its own: a string value escapes its quotes, and only times follow it."""
        at = row_json.rfind(b'"created_at":"')
        end = row_json.find(b'"', at + 14)
        try:
            return at < 0 or datetime.fromisoformat(row_json[at + 14 : end].decode()) < cut
        except (ValueError, TypeError):
            return True

    def _purged(self, cut: bytes | None) -> None:
        """A purge may have deleted any kept row: forget them all, and keep none older than its cut."""
        self._recent.clear()
        self._recent_bytes = 0
        try:
            before = datetime.fromisoformat(cut.decode()) if cut else None
        except ValueError:
            before = None
        if before is None or before.tzinfo is None:
            log.warning("unreadable purge notice %r: kept rows forgotten", cut)
            return
        if self._purged_before is None or before > self._purged_before:
            self._purged_before = before

    async def _listen(self) -> None:
        assert self._subscribed is not None
        await subscribe_forever(
            self.redis_url, self.channel, "result notices", self._subscribed, self._notice, self._lost
        )

    def _notice(self, data: bytes) -> None:
        key, row_json = parse_notice(data)
        if key == PURGED:
            self._purged(row_json)
            return
        self._remember(key, row_json)
        self._wake(key, row_json)

    def stop(self) -> None:
        """The process is stopping: every wait ends now (a long poll answers the row as it is) and
        `stopping` says why to those that must say it (a stream, a call waiting for its jobs)."""
        if not self.stopping:
            log.info("stopping: answering %d waiting requests now", sum(map(len, self._waiters.values())))
        self.stopping = True
        for key in list(self._waiters):
            self._wake(key)

    def _lost(self) -> None:
        self._created.clear()
        # A purge's notice may be among the missed ones.
        self._recent.clear()
        self._recent_bytes = 0
        # Notices may have been missed meanwhile: let every waiter re-read the database.
        for key in list(self._waiters):
            self._wake(key)

    def _wake(self, key: str, row_json: bytes | None = None) -> None:
        for future in self._waiters.pop(key, ()):
            if not future.done():
                future.set_result(row_json)

    async def _ensure_listening(self) -> None:
        if self._task is None or self._task.done():
            self._subscribed = asyncio.Event()
            self._task = asyncio.create_task(self._listen())
        assert self._subscribed is not None
        if self._subscribed.is_set():
            return  # without a trip through the event loop (wait_for's task), a wait behind a burst
        # A short wait for the first subscription; if Redis is down the waiter still times out.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 1.0)

    async def listening(self) -> None:
        """Subscribed (or Redis is down and waiters will time out): `created` may be used."""
        await self._ensure_listening()

    def _expect(self, result_id: uuid.UUID) -> asyncio.Future[bytes | None]:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        if self.stopping:  # nothing to wait for: the process stops
            future.set_result(None)
            return future
        self._waiters.setdefault(str(result_id), set()).add(future)
        return future

    def _forget(self, result_id: uuid.UUID, future: asyncio.Future[bytes | None]) -> None:
        key = str(result_id)
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self._waiters[key]

    @contextlib.asynccontextmanager
    async def watch(self, result_id: uuid.UUID) -> AsyncIterator[asyncio.Future[bytes | None]]:
        """Register interest before re-reading the row, so a notice in between is not lost.
        The future's result is the final row's JSON if the notice carried it, else None."""
        await self._ensure_listening()
        future = self._expect(result_id)
        try:
            yield future
        finally:
            self._forget(result_id, future)

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None
