"""The Celery application of the worker: `celery -A worker.celery_app worker`."""

from __future__ import annotations

import asyncio
import gc
import logging
from functools import cache
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    celeryd_init,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)

from app.config import settings_or_exit
from app.kombu_patch import reuse_redis_clients
from app.logging_setup import configure_logging
from app.queue import JobQueue, celery_config, check_publishable
from app.routes.health import schema_at_start
from worker import metrics
from worker.job_store import reset_store
from worker.outage import get_gate, triton_ready
from worker.pool import JobPool
from worker.runtime import get_runtime, reset_runtime
from worker.sweeper import Sweeper

settings = settings_or_exit()
configure_logging()
reuse_redis_clients()

celery_app = Celery("llmq", include=["worker.tasks"])
celery_app.conf.update(celery_config(settings))
celery_app.conf.update(
    # Jobs spend their time waiting on Triton: coroutines on one loop, WORKER_IN_FLIGHT of them at once.
    worker_pool="worker.pool:JobPool",
    worker_concurrency=settings.WORKER_IN_FLIGHT,
)
check_publishable(celery_app)  # refuse at start what the sweeper's producer cannot honour


@cache
def job_queue() -> JobQueue:
    """The process's producer (the sweeper re-sends lost jobs through it)."""
    return JobQueue(celery_app, settings.CELERY_QUEUE)


@celeryd_init.connect
def _refuse_an_older_schema(**_: Any) -> None:
    # `celery worker` only (not `celery inspect`), before it consumes: every job would fail on it.
    refusal = asyncio.run(schema_at_start(settings))
    if refusal is not None:
        raise SystemExit(f"error: {refusal}")


@after_setup_logger.connect
def _quiet_per_task_lines(**_: Any) -> None:
    # "Task received" / "Task succeeded" per job: at hundreds of jobs per second that is a
    # measurable share of the worker's CPU, and Postgres keeps the record of every job anyway.
    # Failures, retries and this project's own job logs are unaffected.
    if settings.LOG_LEVEL.upper() != "DEBUG":
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)


@worker_ready.connect
def _freeze_startup_objects(**_: Any) -> None:
    # Objects alive at startup live as long as the process: a full collection need not walk them
    # (with the GIL held, stalling every job).
    gc.freeze()


_sweeper: list[Any] = []


@worker_ready.connect
def _show_the_pool_its_consumer(sender: Any = None, **_: Any) -> None:
    if isinstance(getattr(sender, "pool", None), JobPool):
        sender.pool.consumer = sender  # its prefetch count bounds jobs, not messages (worker/pool.py)
        sender.pool.shutdown_grace_s = settings.WORKER_SHUTDOWN_GRACE_S
        sender.pool.hand_back = lambda: get_runtime(settings).hand_back()


@worker_ready.connect
def _start_sweeper_gate_and_metrics(sender: Any = None, **_: Any) -> None:
    gate = get_gate(settings)
    gate.attach(sender)  # the consumer: stopped and started again around Triton outages
    metrics.worker_metrics().watch_triton(lambda: gate.down)
    metrics.serve(settings)
    if settings.WORKER_SWEEPER:

        def triton_down() -> str | None:
            # Asked by every sweep, so that a job failing at its deadline says whether Triton was down.
            if gate.down is not None or triton_ready(settings.TRITON_GRPC_URL, 1.0):
                return gate.down
            return f"Triton at {settings.TRITON_GRPC_URL} does not answer"

        queue = job_queue()
        _sweeper.append(Sweeper(settings, queue.ring, triton_down, queue.waiting, queue.broker_reset).start())


@worker_shutting_down.connect
def _stop_sweeper(**_: Any) -> None:
    while _sweeper:
        _sweeper.pop().stop()  # another worker leads at once


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Only with a forking pool: never share DB connections or the gRPC loop across a fork.
    job_queue.cache_clear()
    reset_runtime()
    reset_store()
