"""Redis restarted (shutdown nosave, started again): the API and the worker go on with their pooled
connections, which the server closed, without a lost doorbell, a false outage on a stream or a hole
in one. Redis and the database here are the test's own: restarting them harms nobody else."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from devstack.processes import ManagedProcess, api_process, free_port, worker_process

from bench.faults.services import OwnRedis
from tests.conftest import ADMIN_KEY, PG_BASE, SLOW_MODEL, bearer
from tests.db_utils import recreate_database
from tests.e2e.helpers import Event, create_context, send, text_of, wait_for_result

# The slow simulated model writes a token every 15 ms: the stream is read while it is written.
STREAMED = {"max_tokens": 40, "ignore_eos": True, "stream": True}
PROMPT_S = 10.0  # a job sent after the restart ends within this (a lost doorbell: 30 s or more)


@pytest.fixture(scope="module")
def stack(e2e_env: dict[str, str], logs_dir: Path) -> Iterator[dict[str, Any]]:
    own_redis = OwnRedis(logs_dir / "redis-restart")
    own_redis.start()
    env = {
        **e2e_env,
        "DATABASE_URL": recreate_database(PG_BASE, "llmq_e2e_redis_restart"),
        "REDIS_URL": own_redis.url,
        "CELERY_QUEUE": e2e_env["CELERY_QUEUE"] + "-redisrestart",
        # The sweeper would hide a lost doorbell only after this: far past PROMPT_S.
        "SWEEP_REQUEUE_AFTER_S": "120",
        "SWEEP_LOST_AFTER_S": "30",
    }
    worker = worker_process(env, logs_dir / "redis-restart-worker.log").start()
    port = free_port()
    api = api_process(env, logs_dir / "redis-restart-api.log", port=port).start()
    try:
        worker.wait_for_log("ready.", timeout_s=60)
        api.wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s=30)
        yield {"redis": own_redis, "url": f"http://127.0.0.1:{port}", "worker": worker, "api": api}
    finally:
        api.stop()
        worker.stop()
        own_redis.stop()


def _restart(own_redis: OwnRedis) -> None:
    with contextlib.suppress(redis.ConnectionError):  # the server closes the connection as it goes
        own_redis.client().shutdown(nosave=True)
    assert own_redis.proc is not None
    own_redis.proc.stop(timeout_s=5)
    own_redis.start()  # the same port, empty


def _read_stream(api: httpx.Client, result_id: str) -> list[Event]:
    """Like `read_events`, but an `error` event (which has no id: id 0 here) ends the read too."""
    events: list[Event] = []
    with api.stream("GET", f"/results/{result_id}/stream", timeout=60) as response:
        assert response.status_code == 200, response.read()
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
            elif not line and "event" in fields:
                event = Event(fields["event"], int(fields.get("id", 0)), json.loads(fields["data"]), 0.0)
                events.append(event)
                fields = {}
                if event.event != "token":
                    break
    return events


def _streamed_job(api: httpx.Client, context_id: str, seed: int) -> tuple[float, list[Event], dict[str, Any]]:
    """Send a streamed job and read its stream: how long until its row was final, the events, the row."""
    sent_at = time.monotonic()
    result_id = send(api, SLOW_MODEL, context_id, {**STREAMED, "seed": seed})
    events = _read_stream(api, result_id)
    row = wait_for_result(api, result_id, timeout_s=60)
    return time.monotonic() - sent_at, events, row


def _run_jobs(
    api: httpx.Client, context_id: str, seeds: range
) -> list[tuple[float, list[Event], dict[str, Any]]]:
    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:  # several pooled connections each
        return list(pool.map(lambda seed: _streamed_job(api, context_id, seed), seeds))


def _problems(job: tuple[float, list[Event], dict[str, Any]]) -> list[str]:
    took_s, events, row = job
    found = [f"{row['id']}: event {e.event} {e.data}" for e in events if e.event not in ("token", "done")]
    ids = [e.id for e in events]
    if ids != list(range(1, len(events) + 1)):
        found.append(f"{row['id']}: stream event ids {ids}")
    if row["status"] != "completed" or not events or events[-1].event != "done":
        found.append(f"{row['id']}: {row['status']}, stream ended with {events[-1:]}")
    if text_of(events) != row["output"]:
        found.append(f"{row['id']}: stream text {text_of(events)!r}, output {row['output']!r}")
    if took_s >= PROMPT_S:
        found.append(f"{row['id']}: ended {took_s:.1f}s after its submit")
    return found


def test_after_a_redis_restart_jobs_are_rung_and_streamed_whole_on_the_old_connections(
    stack: dict[str, Any],
) -> None:
    admin = httpx.Client(base_url=stack["url"], timeout=30, headers=bearer(ADMIN_KEY))
    key = admin.post("/admin/keys", json={"tenant": "redis-restart", "name": "t"}).json()["key"]
    api = httpx.Client(base_url=stack["url"], timeout=30, headers=bearer(key))
    context_id = create_context(api, "Stream this across a Redis restart.")
    before = _run_jobs(api, context_id, range(3))  # every client has pooled connections now
    assert not [problem for job in before for problem in _problems(job)]

    worker: ManagedProcess = stack["worker"]
    api_process_: ManagedProcess = stack["api"]
    connects = worker.log_path.read_text(errors="replace").count("Connected to redis://")
    _restart(stack["redis"])
    deadline = time.monotonic() + 30  # Celery's consumer reconnects on its own
    while worker.log_path.read_text(errors="replace").count("Connected to redis://") <= connects:
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.1)
    time.sleep(3)  # quiet: no command finds out that the server closed the old connections
    worker_log_at, api_log_at = (p.log_path.stat().st_size for p in (worker, api_process_))

    jobs = _run_jobs(api, context_id, range(3, 6))
    api_log = api_process_.log_path.read_bytes()[api_log_at:].decode(errors="replace")
    worker_log = worker.log_path.read_bytes()[worker_log_at:].decode(errors="replace")
    problems = [problem for job in jobs for problem in _problems(job)]
    problems += [f"API: {line}" for line in api_log.splitlines() if "could not enqueue" in line]
    problems += [f"API: {line}" for line in api_log.splitlines() if "submit rate not checked" in line]
    problems += [f"worker: {line}" for line in worker_log.splitlines() if "Redis write failed" in line]
    assert not problems, "\n".join(problems)
