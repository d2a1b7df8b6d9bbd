"""Quotas: jobs (and, counted apart, contexts) submitted per second per key, and jobs pending at
once per tenant.

Neither costs a round trip per request. The rate is counted in Redis (shared by every API process)
in chunks: a process takes up to 1/8 of a key's per-second allowance at once and spends it locally.
The pending count is read from Postgres at most every QUOTA_PENDING_REFRESH_S per tenant and
process, plus this process's jobs committed since and those admitted but not yet committed (so that
concurrent requests count each other: within a process the cap holds exactly); a request that this
count would refuse reads it again first when it counts submits of this process (whose jobs may have
ended) or is older than REFUSE_ON_COUNT_S.
Across processes the cap may be passed by the submits of one refresh interval.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType

from redis.exceptions import RedisError

from app import background
from app.auth import Principal
from app.db import AsyncConnection, Database
from app.errors import AppError, InvalidInput
from app.redis_clients import async_client
from app.repositories import results as results_repo

log = logging.getLogger(__name__)


class OverQuota(AppError):
    status_code = 429

    def __init__(self, message: str, retry_after_s: int, detail: object = None) -> None:
        super().__init__(message, detail=detail, headers={"Retry-After": str(retry_after_s)})


class SubmitRate:
    def __init__(self, redis_url: str, namespace: str) -> None:
        self._redis = async_client(redis_url, socket_connect_timeout=1, socket_timeout=1)
        self._namespace = namespace
        self._allowance: dict[str, tuple[int, int]] = {}  # key -> (second, submits still allowed)
        self._locks: dict[str, asyncio.Lock] = {}

    async def check(self, principal: Principal, units: int = 1, what: str = "jobs") -> None:
        """Count `units` submits of `what` (jobs, or contexts: a count of their own); refuse the request
        (nothing created) past the key's rate. Redis down: allowed."""
        limit = principal.submit_rate_per_s
        if units > limit:
            raise InvalidInput(
                f"this request submits {units} {what}, more than this API key may submit per second "
                f"({limit}); send fewer at a time",
                detail={"limit": "submit_rate_per_s", "value": limit},
            )
        key = principal.rate_key if what == "jobs" else f"{principal.rate_key}:{what}"
        if self._take(key, int(time.time()), units):
            return
        # One chunk request per key at a time: the submits arriving meanwhile share its answer.
        async with self._locks.setdefault(key, asyncio.Lock()):
            second = int(time.time())
            if self._take(key, second, units):
                return
            chunk = max(units, math.ceil(limit / 8))
            counter = f"{self._namespace}:rate:{key}:{second}"
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.incrby(counter, chunk)
                    pipe.expire(counter, 2)
                    total, _ = await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("submit rate not checked (Redis: %s)", exc)
                return
            window, left = self._allowance.get(key, (second, 0))
            left = (left if window == second else 0) + max(0, min(chunk, limit - (int(total) - chunk)))
            if left < units:  # what was granted stays for smaller requests in this second
                self._allowance[key] = (second, left)
                raise OverQuota(
                    f"submit rate limit reached: at most {limit} {what} per second for this API key; "
                    "retry after the time in Retry-After",
                    retry_after_s=1,
                    detail={"limit": "submit_rate_per_s", "value": limit},
                )
            self._allowance[key] = (second, left - units)

    def _take(self, key: str, second: int, units: int) -> bool:
        window, left = self._allowance.get(key, (second, 0))
        if window == second and left >= units:
            self._allowance[key] = (second, left - units)
            return True
        return False

    async def close(self) -> None:
        await self._redis.aclose()


# A refusal rests on a count at most this old (read again otherwise): jobs end all the time.
REFUSE_ON_COUNT_S = 0.25


@dataclass
class _Count:
    read_at: float  # time.monotonic() when the read began
    pending: int  # the tenant's pending jobs then (counted up to the cap)
    added: int = 0  # jobs this process has committed since (some may have ended already)


class PendingJobs:
    def __init__(self, db: Database, refresh_s: float) -> None:
        self._db = db
        self._refresh_s = refresh_s
        self._known: dict[str, _Count] = {}
        self._reads: dict[str, asyncio.Task[_Count]] = {}
        self._background = background.Refreshes("pending-jobs count")
        # Per tenant: jobs admitted and not yet committed (or given up), and recent commits (when,
        # how many): a read that began before a commit may not have seen it.
        self._in_flight: dict[str, int] = {}
        self._commits: dict[str, deque[tuple[float, int]]] = {}

    async def check(self, principal: Principal, jobs: int = 1, conn: AsyncConnection | None = None) -> None:
        """Refuse a request that would create `jobs` jobs (429) while the tenant has `max_pending`
        pending. A refusal rests on a count read after this process's last submit for the tenant
        and at most REFUSE_ON_COUNT_S ago: a client whose jobs have ended is not refused. `conn`: the
        caller's transaction, where a count is read (it must not wait for a second connection)."""
        tenant, cap = principal.tenant, principal.max_pending
        if jobs > cap:
            raise InvalidInput(
                f"this request creates {jobs} jobs, more than tenant '{tenant}' may have pending at once "
                f"({cap}); send fewer at a time",
                detail={"limit": "max_pending", "value": cap},
            )
        known = self._known.get(tenant)
        if known is None or self._refresh_s == 0:
            known = await self._read(tenant, cap, conn)
        elif self._count(tenant, known) + jobs > cap:
            if known.added or time.monotonic() - known.read_at >= min(self._refresh_s, REFUSE_ON_COUNT_S):
                known = await self._read(tenant, cap, conn)
        elif time.monotonic() - known.read_at >= self._refresh_s:
            # This request passes on the old count while one task re-reads it.
            self._background.start(tenant, lambda: self._read(tenant, cap))
        # From here to the reservation nothing awaits: concurrent requests see each other's.
        pending = self._count(tenant, self._known.get(tenant, known))
        if pending + jobs > cap:
            adds = f" and this request would add {jobs}" if jobs > 1 else ""
            raise OverQuota(
                f"pending job limit reached: tenant '{tenant}' has {pending} jobs pending{adds} "
                f"(the limit is {cap}); retry when some have finished",
                retry_after_s=1,
                detail={"limit": "max_pending", "value": cap},
            )
        self._in_flight[tenant] = self._in_flight.get(tenant, 0) + jobs

    def _count(self, tenant: str, known: _Count) -> int:
        return known.pending + known.added + self._in_flight.get(tenant, 0)

    def release(self, tenant: str, jobs: int) -> None:
        """Jobs admitted by `check` that will not be created (the request failed or was refused)."""
        left = self._in_flight.get(tenant, 0) - jobs
        if left > 0:
            self._in_flight[tenant] = left
        else:
            self._in_flight.pop(tenant, None)

    def committed(self, tenant: str, jobs: int) -> None:
        """Jobs admitted by `check` are in the database now."""
        self.release(tenant, jobs)
        now = time.monotonic()
        commits = self._commits.setdefault(tenant, deque())
        commits.append((now, jobs))
        known = self._known.get(tenant)
        if known is not None:
            known.added += jobs
            while commits and commits[0][0] < known.read_at:  # counted by that read
                commits.popleft()

    async def _read(self, tenant: str, cap: int, conn: AsyncConnection | None = None) -> _Count:
        if conn is not None:  # in the caller's transaction: read there, waiting for nothing else
            read_at = time.monotonic()
            return self._store(tenant, read_at, await results_repo.count_pending(conn, tenant, cap))
        # One pooled read per tenant at a time: requests refused together share it.
        reading = self._reads.get(tenant)
        if reading is None:
            reading = self._reads[tenant] = background.detached(self._read_pooled(tenant, cap))
            reading.add_done_callback(lambda done: self._reads.pop(tenant, None))
        return await asyncio.shield(reading)

    async def _read_pooled(self, tenant: str, cap: int) -> _Count:
        read_at = time.monotonic()
        async with self._db.connection() as conn:
            return self._store(tenant, read_at, await results_repo.count_pending(conn, tenant, cap))

    def _store(self, tenant: str, read_at: float, pending: int) -> _Count:
        known = self._known.get(tenant)
        if known is not None and known.read_at > read_at:
            return known  # a read that began later was stored meanwhile
        # Commits since the read began may be missing from it: counted again (a refusal re-reads).
        added = sum(jobs for at, jobs in self._commits.get(tenant, ()) if at >= read_at)
        known = self._known[tenant] = _Count(read_at, pending, added)
        return known


class Admission:
    """The quotas of one request, as an async context: `admit(jobs, conn)` before creating jobs,
    `created(jobs)` once they are committed; jobs admitted and not created are given back when the
    context ends (an error, a refusal by the rate, a replay)."""

    def __init__(self, rate: SubmitRate, pending: PendingJobs, principal: Principal) -> None:
        self._rate, self._pending, self._principal = rate, pending, principal
        self._admitted = 0

    async def admit(self, jobs: int = 1, conn: AsyncConnection | None = None) -> None:
        """The tenant's pending jobs (counted on `conn`, the request's transaction, when it holds
        one), then the key's submit rate (a request refused for the first spends none of the second)."""
        await self._pending.check(self._principal, jobs, conn)
        try:
            await self._rate.check(self._principal, jobs)
        except BaseException:
            self._pending.release(self._principal.tenant, jobs)
            raise
        self._admitted += jobs

    def created(self, jobs: int = 1) -> None:
        jobs = min(jobs, self._admitted)
        self._admitted -= jobs
        self._pending.committed(self._principal.tenant, jobs)

    async def __aenter__(self) -> Admission:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._admitted:
            self._pending.release(self._principal.tenant, self._admitted)
            self._admitted = 0
