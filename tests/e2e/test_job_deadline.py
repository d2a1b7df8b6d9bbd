"""JOB_DEADLINE_S, every job's outer bound, with an API and a worker of their own (a short deadline,
two jobs in flight): a job queued past it is never started, a running one is ended saying so and
its generation aborted in the engine, and a job whose own timeout_s passed ends through that path."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from devstack.processes import ManagedProcess, api_process, free_port, worker_process

from app.repositories import results as repo
from tests.conftest import ADMIN_KEY, E2E_DB, PG_BASE, SLOW_MODEL, bearer
from tests.db_utils import recreate_database
from tests.e2e.helpers import create_context, send, wait_for_result
from tests.localtriton.localtriton_helpers import read_metric

DEADLINE_S = 4
# 480 tokens at the slow model's 15 ms each: ~7.2 s, well past the deadline if nothing stops it.
LONG = {"max_tokens": 480, "ignore_eos": True}
NATURAL_END_S = 7.2
RUNNING_ERROR = f"deadline exceeded: not finished within JOB_DEADLINE_S = {DEADLINE_S} s of its submission"


def _until(condition: Callable[[], object], timeout_s: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def deadline_env(e2e_env: dict[str, str]) -> dict[str, str]:
    # A database of its own: the sweeper of another test's worker would end these jobs first.
    return {
        **e2e_env,
        "DATABASE_URL": recreate_database(PG_BASE, f"{E2E_DB}_deadline"),
        "CELERY_QUEUE": e2e_env["CELERY_QUEUE"] + "-deadline",
        "JOB_DEADLINE_S": str(DEADLINE_S),
        "WORKER_IN_FLIGHT": "2",
    }


@pytest.fixture(scope="module")
def api(deadline_env: dict[str, str], logs_dir: Path) -> Iterator[httpx.Client]:
    port = free_port()
    proc = api_process(deadline_env, logs_dir / "deadline-api.log", port=port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_for_http(f"{url}/health", timeout_s=30)
        created = httpx.post(
            f"{url}/admin/keys", json={"tenant": "deadline", "name": "deadline"}, headers=bearer(ADMIN_KEY)
        )
        assert created.status_code == 201, created.text
        with httpx.Client(base_url=url, timeout=30, headers=bearer(created.json()["key"])) as http:
            yield http
    finally:
        proc.stop()


@pytest.fixture
def start_worker(
    deadline_env: dict[str, str], logs_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ManagedProcess]]:
    """Each test starts its workers (with or without the sweeper); they stop at its end."""
    procs: list[ManagedProcess] = []

    def start(*, sweeper: bool = True) -> ManagedProcess:
        log_path = logs_dir / f"deadline-worker-{request.node.name}-{len(procs)}.log"
        proc = worker_process(deadline_env, log_path, sweeper=sweeper).start()
        procs.append(proc)
        proc.wait_for_log("ready.", timeout_s=60)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()


def _running(triton: Any) -> float:
    return read_metric(triton, "sim_engine_running_requests", SLOW_MODEL)


def test_a_job_queued_past_job_deadline_s_is_never_started_and_fails_saying_so(
    api: httpx.Client, start_worker: Callable[..., ManagedProcess]
) -> None:
    # No sweeper at first: nothing ends the late job before the worker takes it (only its claim can refuse it).
    worker = start_worker(sweeper=False)
    context_id = create_context(api, "Wait your turn.")
    blockers = [send(api, SLOW_MODEL, context_id, {**LONG, "seed": i}) for i in range(2)]
    late = send(api, SLOW_MODEL, context_id, {"max_tokens": 4, "seed": 3})
    for rid in blockers:  # nobody ends them: they run to their end, past the late job's deadline
        assert wait_for_result(api, rid, 30)["status"] == "completed"
    skipped = f"result {late} is finished or held by another worker; skipping"
    row = lambda: api.get(f"/results/{late}").json()  # noqa: E731
    _until(
        lambda: skipped in worker.log_path.read_text() or row()["started_at"] is not None,
        10,
        lambda: f"the worker never took the late job: {row()}",
    )
    assert row()["started_at"] is None and row()["attempts"] == 0, row()

    start_worker()  # a sweeper ends it
    final = wait_for_result(api, late, 10)
    assert final["status"] == "failed" and final["attempts"] == 0 and final["started_at"] is None, final
    assert final["error"] == f"deadline exceeded: still pending {DEADLINE_S} s after submission", final


def test_a_running_job_past_job_deadline_s_is_ended_saying_so_and_aborted_in_the_engine(
    api: httpx.Client, start_worker: Callable[..., ManagedProcess], triton: Any
) -> None:
    worker = start_worker()
    cancelled_before = read_metric(triton, "sim_engine_cancelled_total", SLOW_MODEL)
    sent_at = time.monotonic()
    rid = send(api, SLOW_MODEL, create_context(api, "Talk past the deadline."), LONG)
    _until(lambda: _running(triton) >= 1, 20, lambda: f"never started: {api.get(f'/results/{rid}').json()}")
    final = wait_for_result(api, rid, DEADLINE_S + 10)
    cancelled = lambda: read_metric(triton, "sim_engine_cancelled_total", SLOW_MODEL)  # noqa: E731
    _until(
        lambda: _running(triton) == 0 and cancelled() == cancelled_before + 1,
        NATURAL_END_S,
        lambda: f"the engine still runs it ({_running(triton)} running, {cancelled()} cancelled)",
    )
    assert time.monotonic() - sent_at < NATURAL_END_S - 1  # stopped well before its natural end
    assert final["status"] == "failed" and final["started_at"] is not None, final
    assert final["error"] == RUNNING_ERROR, final
    time.sleep(max(0.0, NATURAL_END_S + 1 - (time.monotonic() - sent_at)))
    assert f"result {rid} was already finished" not in worker.log_path.read_text()  # no outcome came
    assert api.get(f"/results/{rid}").json()["error"] == RUNNING_ERROR


def test_a_job_past_its_own_timeout_s_ends_cancelled_saying_so_not_by_job_deadline_s(
    api: httpx.Client, start_worker: Callable[..., ManagedProcess], deadline_env: dict[str, str]
) -> None:
    start_worker()
    context_id = create_context(api, "Mind your own deadline.")
    # Its message lost (never rung): the sweeper finds it past both deadlines in the same sweep.
    with psycopg.connect(deadline_env["DATABASE_URL"].replace("+psycopg", ""), autocommit=True) as conn:
        unrung = str(
            conn.execute(
                "INSERT INTO result (id, tenant, context_id, model, params, deadline_at) "
                "SELECT gen_random_uuid(), tenant, id, %s, %s::jsonb, now() + make_interval(secs => %s) "
                "FROM context WHERE id = %s RETURNING id",
                (
                    SLOW_MODEL,
                    json.dumps({"max_tokens": 4, "timeout_s": float(DEADLINE_S)}),
                    DEADLINE_S,
                    context_id,
                ),
            ).fetchone()[0]  # type: ignore[index]
        )
    # As tight as JOB_DEADLINE_S, running when both pass.
    running = send(api, SLOW_MODEL, context_id, {**LONG, "timeout_s": DEADLINE_S})
    for rid in (unrung, running):
        row = wait_for_result(api, rid, DEADLINE_S + 10)
        timeout_s = row["params"]["timeout_s"]
        assert row["status"] == "cancelled", row
        assert (
            row["error"]
            == f"deadline passed: not finished within timeout_s = {timeout_s} s of its submission"
        ), row
    assert api.get(f"/results/{unrung}").json()["started_at"] is None


def test_a_job_failed_at_job_deadline_s_while_running_is_told_apart_and_can_keep_its_partial_text(
    deadline_env: dict[str, str],
) -> None:
    """The statements themselves: the claim's refusal, the sweeper's two messages, and the record of
    what a streamed job had produced when its cancel notice stopped it (`record_stopped`)."""
    with psycopg.connect(deadline_env["DATABASE_URL"].replace("+psycopg", ""), autocommit=True) as conn:
        context_id = conn.execute(
            "INSERT INTO context (id, tenant, content) VALUES (gen_random_uuid(), 'deadline', 'x') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        ran, queued = [
            row[0]
            for row in conn.execute(
                "INSERT INTO result (id, tenant, context_id, model, params, created_at) "
                "SELECT gen_random_uuid(), 'deadline', %s, %s, '{\"stream\": true}', now() - interval '1 hour' "
                "FROM generate_series(1, 2) RETURNING id",
                (context_id, SLOW_MODEL),
            ).fetchall()
        ]
        assert not repo.claim_many(conn, [ran], "me", 10, deadline_s=60)  # submitted an hour ago
        assert set(repo.claim_many(conn, [ran], "me", 10, deadline_s=7200)) == {ran}
        expired, running = repo.fail_expired(conn, deadline_s=60)
        assert set(expired) == {ran, queued} and running == [ran]
        errors = dict(
            conn.execute("SELECT id, error FROM result WHERE id = ANY(%s)", ([ran, queued],)).fetchall()
        )
        assert errors == {
            ran: "deadline exceeded: not finished within JOB_DEADLINE_S = 60 s of its submission",
            queued: "deadline exceeded: still pending 60 s after submission",
        }
        row = repo.record_stopped(conn, ran, "partial", 3, 2)
        assert row is not None
        assert (row["status"], row["output"], row["finish_reason"]) == ("failed", "partial", "abort")
        assert repo.record_stopped(conn, ran, "partial and more", 3, 4) is None  # once
