"""Submit rate per key: a one-second window counted in Redis, shared by every API process."""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.auth import Principal
from app.errors import AppError

log = logging.getLogger(__name__)


class OverQuota(AppError):
    status_code = 429

    def __init__(self, message: str, retry_after_s: int, detail: object = None) -> None:
        super().__init__(message, detail=detail, headers={"Retry-After": str(retry_after_s)})


class SubmitRate:
    def __init__(self, redis_url: str, namespace: str) -> None:
        self._redis = aioredis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
        self._namespace = namespace

    async def check(self, principal: Principal) -> None:
        """Count this submit; refuse it (nothing created) past the key's rate. Redis down: allowed."""
        second = int(time.time())
        key = f"{self._namespace}:rate:{principal.rate_key}:{second}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, 2)
                count, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("submit rate not checked (Redis: %s)", exc)
            return
        if int(count) > principal.submit_rate_per_s:
            raise OverQuota(
                f"submit rate limit reached: at most {principal.submit_rate_per_s} submits per second "
                "for this API key; retry after the time in Retry-After",
                retry_after_s=1,
                detail={"limit": "submit_rate_per_s", "value": principal.submit_rate_per_s},
            )

    async def close(self) -> None:
        await self._redis.aclose()
