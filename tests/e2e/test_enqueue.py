"""The doorbell rings only after the commit, and a lost doorbell does not lose the job."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis
from devstack.processes import free_port
from sqlalchemy import create_engine, text

from app.config import Settings
from app.main import create_app
from app.queue import MAX_JOBS_PER_MESSAGE, RUN_JOBS_TASK, Doorbell, JobQueue, make_celery
from tests.conftest import FAST_MODEL, bearer
from tests.e2e.helpers import queued_jobs, wait_for_result

pytestmark = pytest.mark.anyio


def _settings(e2e_env: dict[str, str], **overrides: str) -> Settings:
    return Settings(**{**e2e_env, **overrides})  # type: ignore[arg-type]


def _scratch_queue(e2e_env: dict[str, str], name: str, prefix: str) -> tuple[Settings, JobQueue]:
    """A producer for a queue of its own in the real Redis, with kombu's key prefix if given."""
    settings = _settings(e2e_env, CELERY_QUEUE=f"{name}-{uuid.uuid4().hex[:8]}")
    celery = make_celery(settings)
    if prefix:
        options = celery.conf.broker_transport_options
        celery.conf.broker_transport_options = {**options, "global_keyprefix": prefix}
    return settings, JobQueue(celery, settings.CELERY_QUEUE)


@pytest.fixture
async def visibility_log(e2e_env: dict[str, str]) -> AsyncIterator[list[tuple[uuid.UUID, bool]]]:
    yield []


async def test_job_is_enqueued_only_after_its_row_is_committed(
    e2e_env: dict[str, str],
    api: httpx.Client,
    visibility_log: list[tuple[uuid.UUID, bool]],
    e2e_user_key: str,
) -> None:
    settings = _settings(e2e_env)
    engine = create_engine(settings.DATABASE_URL)
    queue = JobQueue(make_celery(settings), settings.CELERY_QUEUE)

    def checking_enqueue(result_id: uuid.UUID) -> None:
        # Another connection, as the worker would see it at the moment the doorbell rings.
        with engine.connect() as conn:
            visible = conn.execute(text("SELECT 1 FROM result WHERE id = :id"), {"id": result_id}).first()
        visibility_log.append((result_id, visible is not None))
        queue.enqueue(result_id)

    app = create_app(settings, enqueue=checking_enqueue)
    async with (
        app.router.lifespan_context(app),  # opens and closes the app's database pool
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api.test", headers=bearer(e2e_user_key)
        ) as client,
    ):
        context_id = (await client.post("/contexts/", json={"content": "after commit"})).json()["id"]
        sent = await client.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4})
    engine.dispose()
    assert sent.status_code == 202
    result_id = sent.json()["result_id"]
    assert visibility_log == [(uuid.UUID(result_id), True)]
    # The real worker picked up that doorbell.
    assert wait_for_result(api, result_id)["status"] == "completed"


async def test_send_with_redis_down_keeps_the_job_and_the_sweeper_runs_it(
    e2e_env: dict[str, str], api: httpx.Client, e2e_user_key: str
) -> None:
    # This API's broker is a port nobody listens on; the worker (and its sweeper) use the real Redis.
    settings = _settings(e2e_env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api.test", headers=bearer(e2e_user_key)
        ) as client,
    ):
        context_id = (await client.post("/contexts/", json={"content": "no doorbell"})).json()["id"]
        sent = await client.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4, "seed": 1})
        assert sent.status_code == 202, sent.text
        result_id = sent.json()["result_id"]
        assert (await client.get(f"/results/{result_id}")).json()["status"] == "pending"
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["components"]["redis"]["ok"] is False
    # SWEEP_REQUEUE_AFTER_S=3 in the test worker.
    assert wait_for_result(api, result_id, timeout_s=30)["status"] == "completed"


@pytest.mark.parametrize("jobs", [1, 3], ids=["one-job", "three-jobs"])
@pytest.mark.parametrize("prefix", ["", "shared-redis:"], ids=["no-prefix", "key-prefix"])
@pytest.mark.parametrize("via", ["ring", "doorbell"])
def test_doorbell_is_the_message_celery_itself_would_write(
    e2e_env: dict[str, str], via: str, prefix: str, jobs: int
) -> None:
    # JobQueue builds the message with Celery's as_task_v2 and kombu's publish (no send_task per job);
    # Celery's own send_task is the reference. Both go to a scratch queue in the real Redis: the
    # worker's `ring`, and the API's Doorbell from an event loop, with and without kombu's key prefix.
    # Ids rung together share one message.
    settings, queue = _scratch_queue(e2e_env, "doorbell", prefix)
    client = redis.Redis.from_url(settings.REDIS_URL)
    key = prefix + settings.CELERY_QUEUE
    try:
        rids = [uuid.uuid4() for _ in range(jobs)]
        queue.celery.send_task(
            RUN_JOBS_TASK,
            args=[[str(rid) for rid in rids]],
            queue=settings.CELERY_QUEUE,
            task_id=str(rids[0]),
            ignore_result=True,
        )
        if via == "ring":
            assert queue.ring(rids)
        else:

            async def ring_from_the_loop() -> None:
                doorbell = Doorbell(queue, settings.REDIS_URL)
                for rid in rids:
                    doorbell(rid)
                await asyncio.sleep(0.5)
                await doorbell.close()

            asyncio.run(ring_from_the_loop())
        ours, celerys = (json.loads(raw) for raw in client.lrange(key, 0, -1))
    finally:
        client.delete(key)
        queue.close()
        client.close()
    for message in (ours, celerys):
        assert uuid.UUID(message["properties"].pop("delivery_tag"))
        message["headers"].pop("origin")  # the sending process
        message["properties"].pop("reply_to")  # where results would go: no result backend here
    assert ours == celerys


def test_a_burst_is_split_into_messages_of_at_most_max_jobs(e2e_env: dict[str, str]) -> None:
    settings, queue = _scratch_queue(e2e_env, "burst", "")
    rids = [uuid.uuid4() for _ in range(2 * MAX_JOBS_PER_MESSAGE + 3)]
    try:
        assert queue.ring(rids)
        messages = queued_jobs(settings.REDIS_URL, settings.CELERY_QUEUE)
    finally:
        redis.Redis.from_url(settings.REDIS_URL).delete(settings.CELERY_QUEUE)
        queue.close()
    assert [len(message) for message in messages] == [MAX_JOBS_PER_MESSAGE, MAX_JOBS_PER_MESSAGE, 3]
    assert [rid for message in messages for rid in message] == [str(rid) for rid in rids]


@pytest.mark.parametrize("prefix", ["", "shared-redis:"], ids=["no-prefix", "key-prefix"])
def test_a_redis_that_lost_its_keys_is_noticed(e2e_env: dict[str, str], prefix: str) -> None:
    settings, queue = _scratch_queue(e2e_env, "marker", prefix)
    client = redis.Redis.from_url(settings.REDIS_URL)
    marker = f"{prefix}{settings.CELERY_QUEUE}:marker"  # beside the queue's list, under kombu's prefix
    try:
        assert queue.broker_reset() is False  # the first look has nothing to compare with
        assert client.exists(marker)
        assert queue.broker_reset() is False
        client.delete(marker)  # what a FLUSHALL or a restart without persistence does to it
        assert queue.broker_reset() is True
        assert queue.broker_reset() is False
    finally:
        client.delete(marker)
        queue.close()
        client.close()
