"""The sweeper's bound for lost messages, on the real database: short when the broker's queue is
empty (a message can only have been lost), long while messages still wait there, none once Redis
has lost its keys (seen with the real Redis)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
import redis

from app.config import Settings
from app.queue import JobQueue, make_celery
from worker.sweeper import Sweeper, sweep_once


@pytest.fixture
def sync_db(api_db_url: str) -> Any:
    conn = psycopg.connect(api_db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    conn.execute("TRUNCATE result, context, api_key, tenant_limits, idempotency_key")
    yield conn
    conn.close()


def _unstarted_job(conn: psycopg.Connection[Any], idle_s: int) -> uuid.UUID:
    context_id = conn.execute(
        "INSERT INTO context (id, tenant, content) VALUES (gen_random_uuid(), 't', 'x') RETURNING id"
    ).fetchone()[0]  # type: ignore[index]
    return conn.execute(  # type: ignore[index, no-any-return]
        "INSERT INTO result (id, tenant, context_id, model, updated_at) VALUES "
        "(gen_random_uuid(), 't', %s, 'm', now() - make_interval(secs => %s)) RETURNING id",
        (context_id, idle_s),
    ).fetchone()[0]


@pytest.mark.parametrize(("waiting", "resent"), [(0, True), (None, False), (7, False)])
def test_a_job_not_started_for_a_while_is_resent_soon_only_when_the_queue_is_empty(
    sync_db: psycopg.Connection[Any], waiting: int | None, resent: bool
) -> None:
    settings = Settings(SWEEP_REQUEUE_AFTER_S=120, SWEEP_LOST_AFTER_S=15)
    idle = _unstarted_job(sync_db, 30)  # 30 s without a start: over the short bound, under the long one
    fresh = _unstarted_job(sync_db, 5)
    rung: list[uuid.UUID] = []
    sweep_once(sync_db, settings, rung.extend, release_lapsed=True, waiting=lambda: waiting)
    assert rung == ([idle] if resent else [])
    assert fresh not in rung


@pytest.mark.parametrize("waiting", [0, 7, None])
def test_once_redis_lost_its_keys_every_job_not_started_since_is_resent_at_once(
    sync_db: psycopg.Connection[Any], waiting: int | None
) -> None:
    settings = Settings(SWEEP_REQUEUE_AFTER_S=120, SWEEP_LOST_AFTER_S=15)
    long_before = _unstarted_job(sync_db, 30)
    just_before = _unstarted_job(sync_db, 5)  # its message went with the others, however recent
    since = _unstarted_job(sync_db, 0)  # sent after the loss: its message is in the new queue
    rung: list[uuid.UUID] = []
    sweep_once(sync_db, settings, rung.extend, release_lapsed=True, waiting=lambda: waiting, broker_reset_s=2)
    assert sorted(rung) == sorted([long_before, just_before])
    assert since not in rung


def test_the_sweeper_notices_that_redis_lost_its_keys(sync_db: psycopg.Connection[Any]) -> None:
    # The real Redis is shared: instead of a FLUSHALL, only this queue's marker goes (as it would).
    settings = Settings(
        CELERY_QUEUE=f"sweeper-{uuid.uuid4().hex[:8]}",
        SWEEP_INTERVAL_S=0.1,
        SWEEP_REQUEUE_AFTER_S=120,
        SWEEP_LOST_AFTER_S=60,
    )
    queue = JobQueue(make_celery(settings), settings.CELERY_QUEUE)
    client = redis.Redis.from_url(settings.REDIS_URL)
    marker = f"{settings.CELERY_QUEUE}:marker"
    lost = _unstarted_job(sync_db, 30)  # under both bounds: only the loss of Redis's keys re-sends it
    rung: list[uuid.UUID] = []
    sweeper = Sweeper(settings, rung.extend, waiting=lambda: 7, broker_reset=queue.broker_reset).start()
    try:
        deadline = time.monotonic() + 10
        while not client.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.exists(marker), "the leading sweeper keeps a marker beside the queue"
        time.sleep(0.5)  # several sweeps
        assert rung == []
        client.delete(marker)
        while not rung and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rung == [lost]
        time.sleep(0.5)
        assert rung == [lost], "re-sent once: the sweep touched it"
    finally:
        sweeper.stop()
        queue.close()
        client.delete(marker)
        client.close()
