"""The sweeper's bound for lost messages, on the real database: short when the broker's queue is
empty (a message can only have been lost), long while messages still wait there."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from app.config import Settings
from worker.sweeper import sweep_once


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
