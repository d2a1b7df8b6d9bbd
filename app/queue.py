"""The Celery side shared by the API (producer) and the worker (consumer).

The API never imports `worker/`; it sends the job by task name. Only ids travel: the row in
Postgres is the record, the message is only the doorbell.
"""

from __future__ import annotations

import logging
import uuid
from functools import lru_cache

from celery import Celery

from app.config import Settings, get_settings
from app.kombu_patch import reuse_redis_clients

RUN_JOB_TASK = "llmq.run_job"
SWEEP_TASK = "llmq.sweep"

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, object]:
    # Visibility timeout above the longest job, else Redis redelivers a message still being worked on.
    visibility = int(settings.TRITON_REQUEST_TIMEOUT_S + settings.RETRY_BACKOFF_MAX_S + 300)
    return {
        "broker_url": settings.REDIS_URL,
        "broker_transport_options": {"visibility_timeout": visibility},
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.CELERY_QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,  # Postgres holds results
        "task_serializer": "json",
        "accept_content": ["json"],
        # A publish that cannot reach Redis gives up fast: the row is committed and the sweeper re-sends it.
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
    }


def make_celery(settings: Settings) -> Celery:
    reuse_redis_clients()
    celery = Celery("llmq")
    celery.conf.update(celery_config(settings))
    return celery


class JobQueue:
    """Rings the doorbell for committed results."""

    def __init__(self, settings: Settings) -> None:
        self.celery = make_celery(settings)
        self.queue = settings.CELERY_QUEUE

    def enqueue(self, result_id: uuid.UUID) -> bool:
        """A failure is logged, not raised: the row is committed and the sweeper re-sends it."""
        try:
            self.celery.send_task(RUN_JOB_TASK, args=[str(result_id)], queue=self.queue)
            return True
        except Exception:
            log.warning(
                "could not enqueue result %s; the sweeper will re-enqueue it", result_id, exc_info=True
            )
            return False


@lru_cache
def default_queue() -> JobQueue:
    return JobQueue(get_settings())


def get_celery() -> Celery:
    return default_queue().celery


def enqueue_job(result_id: uuid.UUID) -> bool:
    return default_queue().enqueue(result_id)
