"""Completion notices, so that a client can wait for a result instead of polling it.

The worker publishes a result's id on a Redis channel once the result is final; each API
process keeps one subscription and wakes the requests waiting on that id. Notices are only a
hint: a waiter always re-reads Postgres, and a lost notice costs at most the wait timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache

import redis
import redis.asyncio as aioredis

from app.config import Settings

log = logging.getLogger(__name__)


def done_channel(settings: Settings) -> str:
    return f"{settings.CELERY_QUEUE}:done"


@lru_cache
def _publisher(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


def publish_done(settings: Settings, result_ids: list[uuid.UUID]) -> None:
    """Best effort: a failure only means waiters notice at their timeout."""
    if not result_ids:
        return
    try:
        client = _publisher(settings.REDIS_URL)
        channel = done_channel(settings)
        if len(result_ids) == 1:
            client.publish(channel, str(result_ids[0]))
        else:
            pipe = client.pipeline(transaction=False)
            for rid in result_ids:
                pipe.publish(channel, str(rid))
            pipe.execute()
    except redis.RedisError:
        log.warning("could not publish completion of %d result(s)", len(result_ids), exc_info=True)


class ResultWaiter:
    """One Redis subscription per API process, fanned out to the requests that wait."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None

    async def _listen(self) -> None:
        assert self._subscribed is not None
        while True:
            client = aioredis.from_url(self.redis_url)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("result notices: subscription lost, reconnecting", exc_info=True)
                # Notices may have been missed meanwhile: let every waiter re-read the database.
                for key in list(self._waiters):
                    self._wake(key)
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()

    def _wake(self, key: str) -> None:
        for future in self._waiters.pop(key, ()):
            if not future.done():
                future.set_result(None)

    async def _ensure_listening(self) -> None:
        if self._task is None or self._task.done():
            self._subscribed = asyncio.Event()
            self._task = asyncio.create_task(self._listen())
        assert self._subscribed is not None
        # A short wait for the first subscription; if Redis is down the waiter still times out.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 1.0)

    @contextlib.asynccontextmanager
    async def watch(self, result_id: uuid.UUID) -> AsyncIterator[asyncio.Future[None]]:
        """Register interest before re-reading the row, so a notice in between is not lost."""
        await self._ensure_listening()
        key = str(result_id)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(future)
        try:
            yield future
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[key]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
