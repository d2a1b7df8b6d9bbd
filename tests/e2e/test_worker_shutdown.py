"""A worker that stops gracefully finishes what it runs and leaves the messages it had not taken in
Redis (the broker does no ack bookkeeping: Postgres is the record); its pool bounds the jobs in
flight. Under another Celery pool (`-P threads`) the task waits for its job itself."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis
from devstack.processes import ManagedProcess, worker_process
from sqlalchemy import Engine, create_engine, text

from tests.conftest import PG_BASE, SLOW_MODEL
from tests.db_utils import recreate_database
from tests.e2e.helpers import queued_jobs, ring
from tests.localtriton.localtriton_helpers import read_metric


def _pending_jobs(engine: Engine, n: int) -> list[str]:
    """n pending jobs on the slow model (40 tokens each), not yet sent to any queue."""
    with engine.begin() as conn:
        context_id = conn.execute(
            text(
                "INSERT INTO context (id, tenant, content) VALUES (gen_random_uuid(), 'default', 'slowly') RETURNING id"
            )
        ).scalar_one()
        return [
            str(row[0])
            for row in conn.execute(
                text(
                    "INSERT INTO result (id, tenant, context_id, model, params) SELECT gen_random_uuid(), (SELECT tenant FROM context WHERE id = :c), :c, :m, "
                    '\'{"max_tokens": 40, "seed": 1, "temperature": 1}\' FROM generate_series(1, :n) RETURNING id'
                ),
                {"c": context_id, "m": SLOW_MODEL, "n": n},
            )
        ]


@pytest.mark.parametrize("messages", ["one per job", "one for all"])
def test_graceful_stop_finishes_running_jobs_and_leaves_the_rest_in_redis(
    e2e_env: dict[str, str], logs_dir: Path, triton: object, messages: str
) -> None:
    queue = e2e_env["CELERY_QUEUE"] + "-shutdown"
    # A database of its own: the session's worker runs the sweeper (every 1 s, re-sending rows left
    # pending for 3 s) on the e2e database, and would run these rows itself while this worker starts.
    database_url = recreate_database(PG_BASE, "llmq_shutdown")
    engine = create_engine(database_url)
    ids = _pending_jobs(engine, 12)
    if messages == "one per job":
        for rid in ids:
            ring(queue, rid)
    else:  # the worker takes all 12, runs 2 and gives the others back when it stops
        ring(queue, *ids)

    # 2 in flight (the prefetch count): 2 jobs running, 10 still in Redis (or given back to it).
    env = {**e2e_env, "DATABASE_URL": database_url, "CELERY_QUEUE": queue, "WORKER_IN_FLIGHT": "2"}
    worker = worker_process(env, logs_dir / "shutdown-worker.log", sweeper=False).start()
    running_query = text(
        "SELECT count(*) FILTER (WHERE started_at IS NOT NULL), "
        "count(*) FILTER (WHERE started_at IS NOT NULL AND status = 'pending') FROM result WHERE id = ANY(:ids)"
    )
    try:
        worker.wait_for_log("ready.", timeout_s=60)
        deadline = time.monotonic() + 20
        seen_started = None
        while True:
            with engine.connect() as conn:
                started, running = conn.execute(running_query, {"ids": ids}).one()
            # A job's message is acked when the job ends, so no more than WORKER_IN_FLIGHT run at once.
            assert running <= 2, f"{running} jobs running with WORKER_IN_FLIGHT=2"
            if started >= 2 and seen_started is None:
                seen_started = time.monotonic()
            if seen_started is not None and time.monotonic() - seen_started > 0.5:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert worker.popen is not None
        os.kill(worker.popen.pid, signal.SIGTERM)  # warm shutdown, as `docker stop` or Ctrl-C sends
        worker.popen.wait(timeout=60)
    finally:
        worker.stop()

    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, status, started_at FROM result WHERE id = ANY(:ids)"), {"ids": ids}
        ).all()
    engine.dispose()
    done = sum(1 for r in rows if r.status == "completed")
    untouched = sum(1 for r in rows if r.status == "pending" and r.started_at is None)
    assert done >= 2 and done + untouched == len(ids), rows  # nothing left half-claimed
    assert untouched >= len(ids) // 2, rows  # the stop ran what was running, not the queue
    # Every job that did not run is back in the queue for the next worker.
    untouched_ids = {str(r.id) for r in rows if r.status == "pending" and r.started_at is None}
    queued = [rid for message in queued_jobs(e2e_env["REDIS_URL"], queue) for rid in message]
    redis.Redis.from_url(e2e_env["REDIS_URL"]).delete(queue)
    assert sorted(queued) == sorted(untouched_ids) and len(queued) == untouched


def _jobs_on_a_queue_of_their_own(
    e2e_env: dict[str, str], name: str, n: int, *, in_flight: int, one_message: bool
) -> tuple[Engine, list[str], dict[str, str]]:
    """n pending jobs in a database of their own (see above: no sweeper on it), rung on a queue of
    their own (one message for all, or one each); the environment of a worker for them."""
    queue = f"{e2e_env['CELERY_QUEUE']}-{name}"
    database_url = recreate_database(PG_BASE, f"llmq_pool_{name}")
    engine = create_engine(database_url)
    ids = _pending_jobs(engine, n)
    for rung in [ids] if one_message else [[rid] for rid in ids]:
        ring(queue, *rung)
    env = {**e2e_env, "DATABASE_URL": database_url, "CELERY_QUEUE": queue, "WORKER_IN_FLIGHT": str(in_flight)}
    return engine, ids, env


def _most_running_until_all_done(engine: Engine, ids: list[str], worker: ManagedProcess, bound: int) -> int:
    """Watch the jobs until all completed, asserting that no more than `bound` run at once; the most
    seen running at once."""
    worker.wait_for_log("ready.", timeout_s=60)
    deadline, most = time.monotonic() + 60, 0
    while True:
        with engine.connect() as conn:
            done, running = conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE status = 'completed'), "
                    "count(*) FILTER (WHERE started_at IS NOT NULL AND status = 'pending') "
                    "FROM result WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            ).one()
        assert running <= bound, f"{running} jobs running at once, at most {bound} expected"
        most = max(most, running)
        if done == len(ids):
            return int(most)
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.02)


def test_a_message_of_many_jobs_runs_them_all_within_the_in_flight_bound(
    e2e_env: dict[str, str], logs_dir: Path, triton: object
) -> None:
    engine, ids, env = _jobs_on_a_queue_of_their_own(e2e_env, "many", 8, in_flight=2, one_message=True)
    assert redis.Redis.from_url(e2e_env["REDIS_URL"]).llen(env["CELERY_QUEUE"]) == 1
    worker = worker_process(env, logs_dir / "many-per-message-worker.log", sweeper=False).start()
    try:
        most = _most_running_until_all_done(engine, ids, worker, bound=2)
    finally:
        worker.stop()
        engine.dispose()
    assert most == 2  # the message's jobs did run side by side, up to the bound


def test_under_the_threads_pool_each_task_waits_for_its_job(
    e2e_env: dict[str, str], logs_dir: Path, triton: object
) -> None:
    engine, ids, env = _jobs_on_a_queue_of_their_own(e2e_env, "threads", 6, in_flight=3, one_message=False)
    worker = worker_process(env, logs_dir / "threads-pool-worker.log", sweeper=False)
    worker.argv += ["-P", "threads"]  # overrides the app's pool (worker.pool.JobPool)
    worker.start()
    try:
        _most_running_until_all_done(engine, ids, worker, bound=3)  # a thread per job, waiting for it
    finally:
        worker.stop()
        engine.dispose()
    assert "concurrency: 3 (thread)" in worker.log_path.read_text()


def test_a_stop_past_its_grace_hands_running_jobs_to_another_worker(
    e2e_env: dict[str, str], logs_dir: Path, triton: object
) -> None:
    """WORKER_SHUTDOWN_GRACE_S: jobs still running then are aborted in the engine and sent back to
    the queue, their attempt not spent, and the next worker runs them at once (no lease to lapse)."""
    database_url = recreate_database(PG_BASE, "llmq_handback")
    engine = create_engine(database_url)
    queue = e2e_env["CELERY_QUEUE"] + "-handback"
    with engine.begin() as conn:  # 400 tokens: ~6 s each on the slow model
        ids = [
            str(rid)
            for rid in conn.execute(
                text(
                    "WITH c AS (INSERT INTO context (id, tenant, content) VALUES (gen_random_uuid(), 'default', 'long') RETURNING id) "
                    "INSERT INTO result (id, tenant, context_id, model, params) SELECT gen_random_uuid(), 'default', c.id, :m, "
                    '\'{"max_tokens": 400, "ignore_eos": true}\' FROM c, generate_series(1, 3) RETURNING id'
                ),
                {"m": SLOW_MODEL},
            ).scalars()
        ]
    for rid in ids:
        ring(queue, rid)
    env = {**e2e_env, "DATABASE_URL": database_url, "CELERY_QUEUE": queue, "WORKER_IN_FLIGHT": "2"}
    rows_query = text(
        "SELECT id, status, started_at, attempts, error FROM result WHERE id = ANY(:ids) ORDER BY id"
    )
    running = lambda: read_metric(triton, "sim_engine_running_requests", SLOW_MODEL)  # type: ignore[arg-type]  # noqa: E731
    first = worker_process(
        {**env, "WORKER_SHUTDOWN_GRACE_S": "0.5"}, logs_dir / "handback-1.log", sweeper=False
    )
    try:
        first.start().wait_for_log("ready.", timeout_s=60)
        deadline = time.monotonic() + 20
        while running() < 2:
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.05)
        assert first.popen is not None
        stopped_at = time.monotonic()
        os.kill(first.popen.pid, signal.SIGTERM)
        first.popen.wait(timeout=20)
        stop_s = time.monotonic() - stopped_at
    finally:
        first.stop()
    with engine.connect() as conn:
        rows = conn.execute(rows_query, {"ids": ids}).all()
    assert all(r.status == "pending" and r.started_at is None and r.attempts == 0 for r in rows), rows
    handed = [r for r in rows if r.error is not None]
    assert len(handed) == 2 and all(
        "its worker stopped; sent to another worker" in r.error for r in handed
    ), rows
    deadline = time.monotonic() + 5  # the engine drops a cancelled sequence at its next check (50 ms)
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 0  # the engine stopped generating them
    queued = sorted(rid for message in queued_jobs(e2e_env["REDIS_URL"], queue) for rid in message)
    assert queued == sorted(ids)  # the two handed back and the one never started
    assert "handing 2 jobs still running back to the queue" in first.log_path.read_text()
    print(f"stopped in {stop_s:.2f} s with 2 jobs of ~6 s running")

    second = worker_process(env, logs_dir / "handback-2.log", sweeper=False)
    try:
        _most_running_until_all_done(engine, ids, second.start(), bound=2)
    finally:
        second.stop()
    with engine.connect() as conn:
        rows = conn.execute(rows_query, {"ids": ids}).all()
    engine.dispose()
    assert [(r.status, r.attempts) for r in rows] == [("completed", 1)] * 3, rows
