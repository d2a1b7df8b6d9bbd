"""Reuse one Redis client per kombu channel.

kombu's Redis transport builds a new `redis.Redis` client for every queue operation it does
without one; with redis-py 8 building a client costs more than the command itself (about a tenth
of the worker's CPU per job). A client is a thin, thread-safe wrapper around the channel's
connection pool, so one per channel (rebuilt if the channel replaces its pool) is equivalent.
Written against kombu 5.7's `Channel.conn_or_acquire`; any other version keeps kombu's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.version_guard import library_patch

PATCHED_VERSIONS = ("5.7.",)


@library_patch("kombu", PATCHED_VERSIONS, "the Redis client reuse patch")
def reuse_redis_clients() -> bool:
    """Whether it is applied: False on a kombu it was not written for."""
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
    return True
