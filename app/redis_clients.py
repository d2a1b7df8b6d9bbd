"""The API's Redis clients (and the worker's retry policy). Their pools make a request wait for a
free connection instead of failing with "Too many connections" (redis-py's default pool refuses past
its cap), which hundreds of concurrent stream readers would otherwise take for a Redis outage.

A pooled connection the server closed (Redis restarted) fails its next command: redis-py 8 skips
its check for closed connections at checkout (maintenance notifications are on by default) and
retries nothing unless asked. `retry_once` sends such a command again on a new connection, at no
cost while the connection is good (unlike `health_check_interval`'s PING after each idle spell)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError

MAX_CONNECTIONS = 100  # per client and process
WAIT_FOR_CONNECTION_S = 5.0


def retry_once() -> Retry:
    # Not on timeouts: a slow Redis would make every caller wait twice as long.
    return Retry(NoBackoff(), 1, supported_errors=(ConnectionError,))


def async_client(url: str, **options: float) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=WAIT_FOR_CONNECTION_S, retry=retry_once(), **options
    )
    return aioredis.Redis.from_pool(pool)
