"""Prometheus metrics of an API process: its answers (by method, path group and status, with the time
to the answer's head) and the queue's state read from Postgres at each scrape (jobs waiting for a
worker, jobs running, the oldest waiting job's age), at `GET /metrics` (an admin key).

Labels are bounded: a path group is the path's first segment among the API's own, never an id.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import AsyncConnection

_GROUPS = frozenset({"contexts", "models", "results", "admin", "health", "v1", "metrics"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
CONTENT_TYPE = CONTENT_TYPE_LATEST

# The pending jobs by model: waiting for a worker (no start yet) or running, and the oldest waiting.
_QUEUE_STATE = """
    SELECT model,
           count(*) FILTER (WHERE started_at IS NULL) AS queued,
           count(*) FILTER (WHERE started_at IS NOT NULL) AS running,
           extract(epoch FROM now() - min(created_at) FILTER (WHERE started_at IS NULL)) AS oldest_s
      FROM result WHERE status = 'pending' GROUP BY model
"""


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmq_http_requests_total",
            "Requests answered, by method, path group and status",
            ["method", "group", "status"],
            registry=self.registry,
        )
        self.head_seconds = Histogram(
            "llmq_http_response_head_seconds",
            "Time from a request's arrival to its answer's status line (a long poll's includes its wait)",
            ["method", "group"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.jobs = Gauge(
            "llmq_jobs_pending",
            "Pending jobs by model: queued (no worker has started it) or running",
            ["model", "state"],
            registry=self.registry,
        )
        self.oldest = Gauge(
            "llmq_oldest_queued_job_age_seconds",
            "Age of the oldest job no worker has started, by model (0: none waits)",
            ["model"],
            registry=self.registry,
        )
        self._models: set[str] = set()  # the models with pending jobs at a scrape since the start

    async def exposition(self, conn: AsyncConnection) -> bytes:
        """The metrics text, with the queue's state read now (0 for a model seen before with nothing
        pending now: a series that vanished would read as missing data, not as an empty queue)."""
        rows = await (await conn.execute(_QUEUE_STATE)).fetchall()
        for model in self._models:
            self.jobs.labels(model, "queued").set(0)
            self.jobs.labels(model, "running").set(0)
            self.oldest.labels(model).set(0)
        for model, queued, running, oldest_s in rows:
            self._models.add(model)
            self.jobs.labels(model, "queued").set(queued)
            self.jobs.labels(model, "running").set(running)
            self.oldest.labels(model).set(float(oldest_s or 0))
        return generate_latest(self.registry)


class RequestMetrics:
    """Counts every answer, whoever gives it (the key check, the fast path, FastAPI, the body limit)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # The label children, found once: labels() takes a lock and builds its key at every call.
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._heads: dict[tuple[str, str], Any] = {}

    def _count(self, method: str, group: str, status: int, seconds: float) -> None:
        count = self._counts.get((method, group, status))
        if count is None:
            count = self._counts[(method, group, status)] = self.metrics.requests.labels(
                method, group, str(status)
            )
        head = self._heads.get((method, group))
        if head is None:
            head = self._heads[(method, group)] = self.metrics.head_seconds.labels(method, group)
        count.inc()
        head.observe(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        parts = scope["path"].split("/", 2)
        group = parts[1] if len(parts) > 1 and parts[1] in _GROUPS else "other"
        method = scope["method"] if scope["method"] in _METHODS else "other"

        answered = False

        async def counted(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                self._count(method, group, message["status"], time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            # Starlette's outermost middleware answers it 500, outside this one: counted here.
            if not answered:
                self._count(method, group, 500, time.perf_counter() - started)
            raise
