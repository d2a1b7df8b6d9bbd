"""A worker's Prometheus metrics (WORKER_METRICS_PORT), scraped from a real worker on the local Triton
after jobs that complete, fail, are cancelled while running, come twice, are lost (the sweeper sends
them again) or expire (the sweeper fails them). The worker has a database of its own, so that its
sweeper acts on this test's rows only."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from devstack.processes import free_port, worker_process
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FAST_MODEL, PG_BASE, SLOW_MODEL
from tests.db_utils import recreate_database
from tests.e2e.helpers import ring


def _insert(conn: psycopg.Connection[Any], model: str, content: str, params: str, age_s: float = 0) -> str:
    context_id = conn.execute(
        "INSERT INTO context (id, tenant, content) VALUES (gen_random_uuid(), 'default', %s) RETURNING id",
        (content,),
    ).fetchone()[0]  # type: ignore[index]
    return str(
        conn.execute(
            "INSERT INTO result (id, tenant, context_id, model, params, created_at) VALUES "
            "(gen_random_uuid(), 'default', %s, %s, %s::jsonb, now() - make_interval(secs => %s)) RETURNING id",
            (context_id, model, params, age_s),
        ).fetchone()[0]  # type: ignore[index]
    )


def _row(url: str, rid: str) -> tuple[Any, ...]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT status, started_at, completion_tokens FROM result WHERE id = %s", (rid,)
        ).fetchone()
    assert row is not None
    return tuple(row)


def _wait(url: str, rid: str, done: Any, timeout_s: float = 30) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout_s
    while not done(row := _row(url, rid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return row


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_worker_metrics_count_each_way_a_job_ends(e2e_env: dict[str, str], logs_dir: Path) -> None:
    db_url = recreate_database(PG_BASE, "llmq_test_worker_metrics")
    url = db_url.replace("postgresql+psycopg://", "postgresql://")
    queue, port = f"wmetrics-{uuid.uuid4().hex[:8]}", free_port()
    env = {
        **e2e_env,
        "DATABASE_URL": db_url,
        "CELERY_QUEUE": queue,
        "WORKER_METRICS_PORT": str(port),
        "SWEEP_INTERVAL_S": "0.5",
        "SWEEP_LOST_AFTER_S": "2",
        "SWEEP_REQUEUE_AFTER_S": "2",
        "JOB_DEADLINE_S": "30",
    }
    worker = worker_process(env, logs_dir / "metrics-worker.log").start()
    try:
        worker.wait_for_log("ready.", timeout_s=60)
        # Written once the worker is ready: its sweeper would take slower ones for lost messages.
        with psycopg.connect(url, autocommit=True) as conn:
            completes = _insert(conn, FAST_MODEL, "hello", '{"max_tokens": 8}')
            too_long = _insert(conn, FAST_MODEL, "word " * 600, '{"max_tokens": 8}')  # over the context
            to_cancel = _insert(conn, SLOW_MODEL, "a long one", '{"max_tokens": 200, "ignore_eos": true}')
            lost = _insert(
                conn, FAST_MODEL, "never rung", '{"max_tokens": 8}', age_s=5
            )  # the sweeper sends it
            expired = _insert(
                conn, FAST_MODEL, "too old", '{"max_tokens": 8}', age_s=60
            )  # past JOB_DEADLINE_S
        ring(queue, completes, too_long, to_cancel)
        assert _wait(url, to_cancel, lambda r: r[1] is not None)[1] is not None, "the slow job never started"
        with psycopg.connect(url, autocommit=True) as conn:  # what the API's cancel does
            conn.execute(
                "UPDATE result SET status = 'cancelled', finished_at = now() WHERE id = %s", (to_cancel,)
            )
        redis.Redis.from_url(env["REDIS_URL"]).publish(f"{queue}:cancel", to_cancel)
        ended = {
            rid: _wait(url, rid, lambda r: r[0] != "pending") for rid in (completes, too_long, lost, expired)
        }
        assert [ended[rid][0] for rid in (completes, too_long, lost, expired)] == [
            "completed",
            "failed",
            "completed",
            "failed",
        ], ended
        ring(queue, completes)  # a message for a job already finished
        deadline = time.monotonic() + 20
        while True:
            samples = _scrape(port)
            cancelled = samples.get(
                ("llmq_worker_jobs_total", frozenset({("model", SLOW_MODEL), ("outcome", "cancelled")}))
            )
            skipped = samples.get(("llmq_worker_messages_skipped_total", frozenset()))
            if (cancelled and skipped) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        worker.stop()

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    assert value("llmq_worker_jobs_total", model=FAST_MODEL, outcome="completed") == 2  # rung and lost
    assert value("llmq_worker_jobs_total", model=FAST_MODEL, outcome="failed") == 1
    assert value("llmq_worker_jobs_total", model=SLOW_MODEL, outcome="cancelled") == 1
    assert value("llmq_worker_jobs_total", model=SLOW_MODEL, outcome="completed") is None
    assert value("llmq_worker_messages_skipped_total") == 1
    assert value("llmq_worker_jobs_running") == 0
    assert value("llmq_worker_generation_seconds_count", model=FAST_MODEL) == 2
    tokens = ended[completes][2] + ended[lost][2]
    assert tokens > 0 and value("llmq_worker_tokens_total", model=FAST_MODEL, kind="completion") == tokens
    assert (value("llmq_worker_tokens_total", model=FAST_MODEL, kind="prompt") or 0) > 0
    assert value("llmq_worker_triton_up") == 1
    assert value("llmq_sweeper_leading") == 1
    assert value("llmq_sweeper_jobs_total", action="requeued") == 1
    assert value("llmq_sweeper_jobs_total", action="expired") == 1
    assert value("llmq_sweeper_jobs_total", action="lapsed") == 0
