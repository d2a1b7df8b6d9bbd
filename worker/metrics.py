"""Prometheus metrics of a worker process, served on WORKER_METRICS_PORT (none when unset): how its
jobs ended, by model and outcome; the jobs it runs now; generation times and tokens; Triton as this
process sees it; and what the sweeper did while this process led it.

Recorded whether served or not: a few counter increments per job. Labels are bounded: a model is one
the API accepted (Triton's repository), an outcome one of `OUTCOMES`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from app.config import Settings

log = logging.getLogger(__name__)

OUTCOMES = (
    "completed",
    "failed",  # the engine refused it, its attempts ran out, or an error on our side
    "cancelled",  # by a client's cancel (before it started, or aborted while running)
    "deadline",  # its own timeout_s passed
    "retried",  # an attempt failed and the job goes back to the queue after a backoff
    "requeued",  # given back without spending an attempt: Triton unreachable, or this worker stopping
    "dropped",  # ended elsewhere while it ran (a cancel, or the sweeper past JOB_DEADLINE_S)
)
SWEEP_ACTIONS = ("lapsed", "requeued", "expired", "timed_out")


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._ends = Counter(
            "llmq_worker_jobs_total",
            "Jobs this worker process handled, by model and how they ended (or left it)",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.skipped = Counter(
            "llmq_worker_messages_skipped_total",
            "Messages for a job already finished or held by another worker (sent twice, or late)",
            registry=self.registry,
        )
        self.running = Gauge(
            "llmq_worker_jobs_running",
            "Jobs this worker process has claimed and not yet ended",
            registry=self.registry,
        )
        self._seconds = Histogram(
            "llmq_worker_generation_seconds",
            "Time from a generation's request to Triton to its last response, completed jobs only",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self._tokens = Counter(
            "llmq_worker_tokens_total",
            "Tokens of completed jobs, by model and kind (prompt or completion)",
            ["model", "kind"],
            registry=self.registry,
        )
        self.triton_up = Gauge(
            "llmq_worker_triton_up",
            "1 while this worker reaches Triton, 0 while it waits for Triton to come back",
            registry=self.registry,
        )
        self.triton_up.set(1)
        self.sweeper_leading = Gauge(
            "llmq_sweeper_leading",
            "1 while this worker process is the one that sweeps",
            registry=self.registry,
        )
        self._swept = Counter(
            "llmq_sweeper_jobs_total",
            "Jobs the sweeper acted on while this process led: lapsed (its worker died, sent again), "
            "requeued (its message was lost, sent again), expired (failed past JOB_DEADLINE_S), "
            "timed_out (ended past its own timeout_s)",
            ["action"],
            registry=self.registry,
        )
        for action in SWEEP_ACTIONS:
            self._swept.labels(action)
        # Label children by key: labels() takes a lock and builds its key at every call.
        self._end_children: dict[tuple[str, str], Counter] = {}
        self._model_children: dict[str, tuple[Histogram, Counter, Counter]] = {}

    def job_ended(self, model: str, outcome: str) -> None:
        child = self._end_children.get((model, outcome))
        if child is None:
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}")
            child = self._end_children.setdefault((model, outcome), self._ends.labels(model, outcome))
        child.inc()

    def generated(
        self, model: str, seconds: float, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        children = self._model_children.get(model)
        if children is None:
            children = self._model_children.setdefault(
                model,
                (
                    self._seconds.labels(model),
                    self._tokens.labels(model, "prompt"),
                    self._tokens.labels(model, "completion"),
                ),
            )
        seconds_child, prompt_child, completion_child = children
        seconds_child.observe(seconds)
        if prompt_tokens:
            prompt_child.inc(prompt_tokens)
        if completion_tokens:
            completion_child.inc(completion_tokens)

    def swept(self, counts: dict[str, int]) -> None:
        for action in SWEEP_ACTIONS:
            if counts.get(action):
                self._swept.labels(action).inc(counts[action])

    def watch_triton(self, down: Callable[[], str | None]) -> None:
        """Read Triton's state from `down()` (why it is down, or None) at each scrape."""
        self.triton_up.set_function(lambda: 0.0 if down() is not None else 1.0)


@cache
def worker_metrics() -> WorkerMetrics:
    """The process's metrics (one registry per process)."""
    return WorkerMetrics()


def serve(settings: Settings) -> bool:
    """Serve the metrics on WORKER_METRICS_HOST:WORKER_METRICS_PORT, if set (a thread of its own).
    A port that cannot be had is logged, not fatal: the worker's jobs matter more than its metrics,
    and a scraper reports the target down."""
    port = settings.WORKER_METRICS_PORT
    if port is None:
        return False
    try:
        start_http_server(port, addr=settings.WORKER_METRICS_HOST, registry=worker_metrics().registry)
    except OSError as exc:
        log.error(
            "metrics: cannot listen on %s:%d (%s); this worker serves no metrics",
            settings.WORKER_METRICS_HOST,
            port,
            exc.strerror or exc,
        )
        return False
    log.info("metrics: serving on http://%s:%d/metrics", settings.WORKER_METRICS_HOST, port)
    return True
