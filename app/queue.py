"""The Celery side shared by the API (producer) and the worker (consumer).

The API never imports `worker/`; it sends the job by task name. Only ids travel: the row in
Postgres is the record, the message is only the doorbell.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import socket
import threading
import uuid
from functools import lru_cache

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from app.config import Settings, get_settings
from app.kombu_patch import reuse_redis_clients

RUN_JOB_TASK = "llmq.run_job"
SWEEP_TASK = "llmq.sweep"

log = logging.getLogger(__name__)

_MAX_RING = 500  # doorbells per LPUSH


def celery_config(settings: Settings) -> dict[str, object]:
    return {
        "broker_url": settings.REDIS_URL,
        # No ack emulation in Redis: kombu's per-message "unacked" bookkeeping (a hash and a sorted
        # set written on every delivery and ack) cost ~45 % of the worker's CPU per job (measured:
        # 4.4 -> 2.4 ms/job, 203 -> 350 jobs/s). Postgres is the record: a message lost with a
        # crashed worker leaves a pending row that the sweeper sends again (sooner than a
        # visibility timeout would), and a graceful stop still hands prefetched messages back.
        "broker_transport_options": {"ack_emulation": False},
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


def doorbell_message(result_id: uuid.UUID, queue: str, origin: str) -> bytes:
    """`run_job(result_id)` as Celery (protocol 2) and kombu's Redis transport would store it.

    The API rings one doorbell per job; through `send_task` that cost ~280 us of CPU per job
    (routing, options, signals, kombu's message object), here ~20 us. The format is what
    `send_task` writes, field for field (tests/e2e/test_enqueue.py compares the two)."""
    task_id = str(result_id)
    args = [task_id]
    body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": RUN_JOB_TASK,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": "{}",
            "origin": origin,
            "ignore_result": True,  # Postgres holds the results
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message).encode()


class JobQueue:
    """Rings the doorbell for committed results."""

    def __init__(self, settings: Settings) -> None:
        self.celery = make_celery(settings)
        self.queue = settings.CELERY_QUEUE
        # Priority 0 messages of a kombu Redis queue are a list named after the queue.
        self._redis = redis.Redis.from_url(
            settings.REDIS_URL,
            socket_connect_timeout=1,
            socket_timeout=1,
            retry=Retry(ExponentialBackoff(cap=0.3, base=0.1), 2),
        )
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._later: queue.SimpleQueue[uuid.UUID | None] = queue.SimpleQueue()
        self._publisher: threading.Thread | None = None
        self._lock = threading.Lock()

    def enqueue(self, result_id: uuid.UUID) -> bool:
        return self.ring([result_id])

    def ring(self, result_ids: list[uuid.UUID]) -> bool:
        """One LPUSH for all of them. A failure is logged, not raised: the rows are committed
        and the sweeper re-sends them."""
        try:
            self._redis.lpush(
                self.queue, *(doorbell_message(rid, self.queue, self._origin) for rid in result_ids)
            )
            return True
        except redis.RedisError:
            log.warning(
                "could not enqueue %d result(s); the sweeper will re-enqueue them",
                len(result_ids),
                exc_info=True,
            )
            return False

    def enqueue_later(self, result_id: uuid.UUID) -> None:
        """Hand the doorbell to this process's publisher thread and return at once.

        The API calls this after the commit: the request does not wait for Redis (nor hops to
        a thread pool per request). If the process dies before the publish, the sweeper finds
        the pending row and sends it."""
        if self._publisher is None:
            with self._lock:
                if self._publisher is None:
                    self._publisher = threading.Thread(
                        target=self._publish_loop, name="job-publisher", daemon=True
                    )
                    self._publisher.start()
        self._later.put(result_id)

    def _publish_loop(self) -> None:
        while True:
            batch = [self._later.get()]
            # Whatever has queued up meanwhile goes in the same round trip.
            while len(batch) < _MAX_RING and not self._later.empty():
                batch.append(self._later.get_nowait())
            ids = [rid for rid in batch if rid is not None]
            if ids:
                self.ring(ids)
            if len(ids) < len(batch):
                return

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish what is queued, then stop the publisher thread."""
        if self._publisher is not None:
            self._later.put(None)
            self._publisher.join(timeout_s)
            self._publisher = None
        self._redis.close()


@lru_cache
def default_queue() -> JobQueue:
    return JobQueue(get_settings())


def get_celery() -> Celery:
    return default_queue().celery


def enqueue_job(result_id: uuid.UUID) -> bool:
    return default_queue().enqueue(result_id)
