"""The API's Redis clients. Their pools make a request wait for a free connection instead of failing
with "Too many connections" (redis-py's default pool refuses past its cap), which hundreds of
concurrent stream readers would otherwise take for a Redis outage."""

from __future__ import annotations

import redis.asyncio as aioredis

MAX_CONNECTIONS = 100  # per client and process
WAIT_FOR_CONNECTION_S = 5.0


def async_client(url: str, **options: float) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=WAIT_FOR_CONNECTION_S, **options
    )
    return aioredis.Redis.from_pool(pool)
