"""The Celery tasks that start jobs (the sweeper is a thread of every worker: worker/sweeper.py)."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from app.config import get_settings
from app.queue import RUN_JOB_TASK, RUN_JOBS_TASK
from worker.celery_app import celery_app, job_queue
from worker.jobs import run_job as job
from worker.pool import defer, start_when_room
from worker.runtime import InferenceRuntime, get_runtime

log = logging.getLogger(__name__)


@celery_app.task(name=RUN_JOBS_TASK)
def run_jobs(result_ids: list[str]) -> None:
    _start(result_ids)


@celery_app.task(name=RUN_JOB_TASK)
def run_job(result_id: str) -> None:
    _start([result_id])


def _start(result_ids: list[str]) -> None:
    settings = get_settings()
    runtime = get_runtime(settings)  # cancels reach this process from its creation on
    jobs: list[tuple[uuid.UUID, Coroutine[Any, Any, None]]] = []
    for raw in result_ids if isinstance(result_ids, list) else [result_ids]:
        try:
            result_id = uuid.UUID(str(raw))
        except ValueError:  # not from this project's producer: nothing to run
            log.error("job message with an invalid result id %r: skipped", str(raw)[:64])
            continue
        jobs.append((result_id, job(settings, runtime, result_id, job_queue().ring)))
    for result_id, coro in jobs:
        ended = defer()
        if ended is None:  # not under worker.pool.JobPool: this thread waits for its jobs
            runtime.run(_all([coro for _, coro in jobs]))
            return
        start_when_room(
            functools.partial(_submit, runtime, coro), ended, functools.partial(_give_back, result_id, coro)
        )


def _submit(runtime: InferenceRuntime, coro: Coroutine[Any, Any, None], ended: Callable[[], None]) -> None:
    try:
        runtime.submit(coro, ended)
    except BaseException:
        coro.close()
        ended()  # never started: this job ends now
        raise


def _give_back(result_id: uuid.UUID, coro: Coroutine[Any, Any, None]) -> None:
    """A job this worker took but will not start (it is stopping): back in the queue for another."""
    coro.close()
    job_queue().ring([result_id])


async def _all(jobs: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*jobs)
