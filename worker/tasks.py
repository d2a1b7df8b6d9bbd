"""The Celery task that starts a job (the sweeper is a thread of every worker: worker/sweeper.py)."""

from __future__ import annotations

import uuid

from app.config import get_settings
from app.queue import RUN_JOB_TASK
from worker.celery_app import celery_app, job_queue
from worker.jobs import run_job as job
from worker.pool import defer
from worker.runtime import get_runtime


@celery_app.task(name=RUN_JOB_TASK)
def run_job(result_id: str) -> None:
    settings = get_settings()
    runtime = get_runtime(settings)  # cancels reach this process from its creation on
    coro = job(settings, runtime, uuid.UUID(result_id), job_queue().ring)
    ended = defer()
    if ended is None:  # not under worker.pool.JobPool: this thread waits for its job
        runtime.run(coro)
    else:
        try:
            runtime.submit(coro, ended)
        except BaseException:
            ended()  # never started: the task ends now
            raise
