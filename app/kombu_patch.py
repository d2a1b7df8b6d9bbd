"""Reuse one Redis client per kombu channel.

kombu's Redis transport (5.7) builds a new `redis.Redis` client for every queue operation it
does without one (publish, the unacked-message bookkeeping of every delivery and ack). With
redis-py 8 building a client costs more than the Redis command itself: profiles of the worker
showed about a tenth of its CPU per job in `Redis.__init__`. A client is only a thin wrapper
around the channel's connection pool and is thread-safe, so one per channel (rebuilt if the
channel replaces its pool) is equivalent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_applied = False


def reuse_redis_clients() -> None:
    global _applied
    if _applied:
        return
    from kombu.transport import redis as kombu_redis

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_llmq_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, self._create_client())
            self.__dict__["_llmq_client"] = cached
        yield cached[1]

    kombu_redis.Channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]
    _applied = True
