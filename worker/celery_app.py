"""The Celery application of the worker: `celery -A worker.celery_app worker`."""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from functools import cache
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, worker_process_init, worker_ready

from app.config import get_settings
from app.kombu_patch import reuse_redis_clients
from app.logging_setup import configure_logging
from app.queue import SWEEP_TASK, JobQueue, celery_config, check_publishable
from worker.cancels import reset_listener
from worker.job_store import reset_store
from worker.runtime import reset_runtime

settings = get_settings()
configure_logging()
reuse_redis_clients()

celery_app = Celery("llmq", include=["worker.tasks"])
celery_app.conf.update(celery_config(settings))
celery_app.conf.update(
    # Jobs spend their time waiting on Triton, so threads (not processes) give many in flight cheaply.
    worker_pool="threads",
    worker_concurrency=settings.WORKER_IN_FLIGHT,
    beat_schedule={"sweep": {"task": SWEEP_TASK, "schedule": settings.SWEEP_INTERVAL_S}},
    beat_schedule_filename=os.path.join(tempfile.gettempdir(), f"llmq-beat-{settings.CELERY_QUEUE}"),
)
check_publishable(celery_app)  # refuse at start what the sweeper's producer cannot honour


@cache
def job_queue() -> JobQueue:
    """The process's producer (the sweeper re-sends lost jobs through it)."""
    return JobQueue(celery_app, settings.CELERY_QUEUE)


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


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Only with a forking pool: never share DB connections or the gRPC loop across a fork.
    job_queue.cache_clear()
    reset_runtime()
    reset_listener()
    reset_store()
