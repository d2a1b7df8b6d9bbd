"""The one producer of Celery messages, shared by the API (submits) and the worker (the sweeper).

Only ids travel: the row in Postgres is the record, the message is only the doorbell. The message
is built once by Celery (`amqp.as_task_v2`) and encoded by kombu (`Producer.publish`, whose Redis
command is captured instead of run); each message is that one with its own ids and delivery tag.
Ids rung together share a message (`run_jobs`, up to MAX_JOBS_PER_MESSAGE: the worker's cost is per
message), and whatever has queued up goes in one LPUSH (kombu's publish per job cost several times
more of the API's CPU and GIL). `send_task`'s per-call routing is skipped, so the settings that would
change where a task goes are refused at start rather than ignored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Celery
from kombu import Connection, Producer

from app import background
from app.config import Settings
from app.kombu_patch import reuse_redis_clients
from app.redis_clients import async_client

RUN_JOBS_TASK = "llmq.run_jobs"
RUN_JOB_TASK = "llmq.run_job"  # one id per message: what producers before run_jobs sent
MAX_JOBS_PER_MESSAGE = 16  # bounds how many jobs one worker takes at once from a burst

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_BATCH = 500  # ids per LPUSH


class UnsupportedQueueSetting(RuntimeError):
    """A Celery setting this producer cannot honour."""


def celery_config(settings: Settings) -> dict[str, object]:
    return {
        "broker_url": settings.REDIS_URL,
        # No ack emulation in Redis: its per-message bookkeeping (a hash and a sorted set written on
        # every delivery and ack) nearly doubled the worker's CPU per job. Postgres is the record: a
        # message lost with a crashed worker is re-sent by the sweeper.
        "broker_transport_options": {"ack_emulation": False, "socket_connect_timeout": 2},
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.CELERY_QUEUE,
        # The workers' broadcasts (mingle at start, gossip, remote control) and events stay within
        # the stack: with Celery's defaults every stack sharing the Redis hears every other's.
        "control_exchange": settings.CELERY_QUEUE,
        "event_exchange": f"{settings.CELERY_QUEUE}.ev",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,  # Postgres holds results
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
    }


def check_publishable(celery: Celery) -> None:
    """Refuse settings under which a job message would go somewhere no worker reads."""
    conf = celery.conf
    if conf.task_routes:
        raise UnsupportedQueueSetting(
            "task_routes is set, but jobs are published straight to CELERY_QUEUE: remove the routes "
            "and run one stack per queue"
        )
    if conf.task_default_priority is not None or conf.task_queue_max_priority is not None:
        raise UnsupportedQueueSetting(
            "task priorities are not supported: jobs are published without a priority"
        )
    if conf.task_serializer != "json" or conf.task_protocol != 2:
        raise UnsupportedQueueSetting("jobs are published as JSON with task protocol 2")


def make_celery(settings: Settings) -> Celery:
    reuse_redis_clients()
    celery = Celery("llmq")
    celery.conf.update(celery_config(settings))
    return celery


# Stands for the jobs' ids in the template message (any UUID works: it is replaced as a string).
_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"


class _Capture:
    """A kombu publish batch (the interface `Producer.batch()` drives) that keeps the Redis
    commands kombu would run instead of running them."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def publish(self, message: Any, **kwargs: Any) -> Any:
        return self.channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass


@dataclass(frozen=True)
class _Template:
    key: str  # the Redis list kombu pushes to (prefix and priority applied)
    payload: str  # kombu's JSON of the whole message, for the placeholder id
    body_b64: str  # its base64 body, and that body decoded
    body_json: str
    delivery_tag: str

    def message(self, result_ids: list[uuid.UUID]) -> str:
        """`run_jobs(result_ids)`, with the first id as the task's id (as `send_task` would write it)."""
        ids = [str(rid) for rid in result_ids]
        args_json = ", ".join(f'"{rid}"' for rid in ids)
        body_json = self.body_json.replace(f'"{_PLACEHOLDER}"', args_json)
        body = base64.b64encode(body_json.encode()).decode()
        return (
            self.payload.replace(self.body_b64, body)
            .replace(self.delivery_tag, str(uuid.uuid4()))
            .replace(f"'{_PLACEHOLDER}'", ", ".join(f"'{rid}'" for rid in ids))  # argsrepr
            .replace(_PLACEHOLDER, ids[0])
        )

    def messages(self, result_ids: list[uuid.UUID]) -> list[str]:
        step = MAX_JOBS_PER_MESSAGE
        return [self.message(result_ids[i : i + step]) for i in range(0, len(result_ids), step)]


class JobQueue:
    """Rings the doorbell for committed results (`ring`; the API's event loop uses `Doorbell`)."""

    def __init__(self, celery: Celery, queue_name: str) -> None:
        check_publishable(celery)
        self.celery = celery
        self.queue = queue_name
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._template: _Template | None = None
        self._producer_lock = threading.Lock()
        self._marker_seen = False

    def _get_producer(self) -> Producer:
        if self._producer is None:
            connection = self.celery.connection_for_write()
            # One quick try: a failed publish is re-sent by the sweeper, it must not hang here.
            connection.ensure_connection(max_retries=1)
            self._connection = connection
            self._producer = Producer(connection.default_channel)
            self._template = self._capture_template(self._producer)
        return self._producer

    def _capture_template(self, producer: Any) -> _Template:
        capture = _Capture(producer.channel)
        # Only this producer's own channel is told to capture (kombu's batch asks it for a session).
        producer.channel.create_publish_batch = lambda max_size: capture
        with producer.batch():
            self._publish(producer, _PLACEHOLDER)
        [(command, (key, payload))] = capture.commands
        if command != "lpush":
            raise UnsupportedQueueSetting(
                f"kombu publishes jobs with {command!r}, expected an LPUSH to a list"
            )
        message = json.loads(payload)
        return _Template(
            key=key,
            payload=payload,
            body_b64=message["body"],
            body_json=base64.b64decode(message["body"]).decode(),
            delivery_tag=message["properties"]["delivery_tag"],
        )

    def has_template(self) -> bool:
        return self._template is not None

    def _drop_producer(self) -> None:
        if self._connection is not None:
            try:
                self._connection.release()
            except Exception:  # already broken: nothing to release
                log.debug("releasing a broken broker connection", exc_info=True)
        self._connection = None
        self._producer = None
        self._template = None

    def _with_broker(self, what: str, command: Callable[[Any, _Template], T], failed: T) -> T:
        """`command(client, template)` on kombu's own Redis client (its key prefix applied); a
        failure is logged (could not `what`) and answers `failed`, the connection made anew next time."""
        with self._producer_lock:
            try:
                producer: Any = self._get_producer()
                assert self._template is not None  # made with the producer
                with producer.channel.conn_or_acquire() as client:
                    return command(client, self._template)
            except Exception:
                self._drop_producer()
                log.warning("could not %s", what, exc_info=True)
                return failed

    def ring(self, result_ids: list[uuid.UUID]) -> bool:
        """Push `run_jobs` messages for these ids, in one LPUSH. A failure is logged, not raised:
        the rows are committed and the sweeper re-sends them."""

        def push(client: Any, template: _Template) -> bool:
            client.lpush(template.key, *template.messages(result_ids))
            return True

        what = f"enqueue {len(result_ids)} result(s); the sweeper will re-enqueue them"
        return self._with_broker(what, push, False)

    def broker_reset(self) -> bool:
        """Whether Redis lost its keys since the last call (flushed, or restarted without persistence),
        taking every queued message with them: a marker kept beside the queue is gone. False on the
        first call (nothing to compare with) and when Redis cannot say."""

        def look(client: Any, template: _Template) -> bool:
            created = bool(client.set(f"{template.key}:marker", b"1", nx=True))
            reset, self._marker_seen = created and self._marker_seen, True
            return reset

        return self._with_broker("look for the queue's marker", look, False)

    def waiting(self) -> int | None:
        """How many job messages wait in the broker (None: Redis could not say)."""
        return self._with_broker("read the queue's length", lambda client, t: int(client.llen(t.key)), None)

    def _publish(self, producer: Any, task_id: str) -> None:
        amqp: Any = self.celery.amqp  # args as a list, as send_task passes them (argsrepr shows it)
        message = amqp.as_task_v2(task_id, RUN_JOBS_TASK, args=[[task_id]], ignore_result=True)
        producer.publish(
            message.body,
            exchange="",
            routing_key=self.queue,
            headers=message.headers,
            serializer="json",
            **message.properties,
        )

    def messages(self, result_ids: list[uuid.UUID]) -> tuple[str, list[str]]:
        """The Redis list (with kombu's key prefix) and the messages `ring` would push there.
        May connect to Redis (blocking) the first time."""
        with self._producer_lock:
            try:
                producer: Any = self._get_producer()
            except Exception:
                self._drop_producer()
                raise
            template = self._template
            assert template is not None  # made with the producer
            key = f"{producer.channel.global_keyprefix or ''}{template.key}"
            return key, template.messages(result_ids)

    def enqueue(self, result_id: uuid.UUID) -> bool:
        return self.ring([result_id])

    def close(self) -> None:
        with self._producer_lock:
            self._drop_producer()


class Doorbell:
    """The API's doorbell, rung from its event loop: ids rung while a push is on its way go in
    the next one, one LPUSH each (no thread, no blocking call on the loop). Best effort like
    `JobQueue.ring`: the rows are committed, and the sweeper re-sends what was not pushed."""

    def __init__(self, job_queue: JobQueue, redis_url: str) -> None:
        self._job_queue = job_queue
        self._redis = async_client(redis_url, socket_connect_timeout=1, socket_timeout=2)
        self._ids: list[uuid.UUID] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def __call__(self, result_id: uuid.UUID) -> None:
        self._ids.append(result_id)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._push_forever())
        assert self._wake is not None
        self._wake.set()

    async def _push_forever(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._push()

    async def _push(self) -> None:
        ids, self._ids = self._ids[:_MAX_BATCH], self._ids[_MAX_BATCH:]
        if self._ids:
            assert self._wake is not None
            self._wake.set()
        if not ids:
            return
        try:
            if self._job_queue.has_template():
                key, messages = self._job_queue.messages(ids)
            else:  # connects to Redis through kombu once: not on the loop
                key, messages = await asyncio.to_thread(self._job_queue.messages, ids)
            await self._redis.lpush(key, *messages)
        except (
            asyncio.CancelledError
        ):  # closing: `close` pushes them (twice at worst: a claim runs a job once)
            self._ids[:0] = ids
            raise
        except Exception:
            log.warning(
                "could not enqueue %d result(s); the sweeper will re-enqueue them", len(ids), exc_info=True
            )

    async def close(self) -> None:
        """Push what is waiting, then stop."""
        await background.stop(self._task)
        self._task = None
        while self._ids:
            await self._push()
        await self._redis.aclose()
