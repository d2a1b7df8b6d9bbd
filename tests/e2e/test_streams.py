"""Live token streams, cancel with the partial output kept, and per-job deadlines, through the real
API, worker, Redis, Postgres and Triton (simulated engine)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import FAST_MODEL, SLOW_MODEL
from tests.e2e.helpers import Event, create_context, read_events, ring, send, text_of, wait_for_result
from tests.localtriton.localtriton_helpers import read_metric

# The slow simulated model writes a token every 15 ms: 80 tokens take ~1.2 s.
STREAMED = {"max_tokens": 80, "ignore_eos": True, "stream": True, "seed": 3}


def _until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _check_sequence(events: list[Event], first_id: int = 1) -> None:
    ids = [e.id for e in events]
    assert ids == list(range(first_id, first_id + len(events))), ids
    assert events[-1].event == "done" and all(e.event == "token" for e in events[:-1])


def test_a_stream_read_from_the_start_is_live_and_adds_up_to_the_output(api: httpx.Client) -> None:
    result_id = send(api, SLOW_MODEL, create_context(api, "Stream this."), STREAMED)
    status_at_first_token: list[str] = []

    def on_event(event: Event) -> None:
        if event.event == "token" and not status_at_first_token:
            status_at_first_token.append(api.get(f"/results/{result_id}").json()["status"])

    events = read_events(api, result_id, on_event=on_event)
    _check_sequence(events)
    final = events[-1].data
    assert final["id"] == result_id and final["status"] == "completed"
    assert status_at_first_token == ["pending"]  # text came while the job was still running
    assert len(events) > 10  # piece by piece, not the whole text at the end
    assert text_of(events) == final["output"] and final["completion_tokens"] == 80
    assert api.get(f"/results/{result_id}").json() == final


def test_a_late_reader_gets_everything_from_the_start_and_a_resumed_one_the_rest(api: httpx.Client) -> None:
    result_id = send(api, SLOW_MODEL, create_context(api, "Stream this, late."), STREAMED)
    _until(lambda: api.get(f"/results/{result_id}").json()["started_at"], 20, "the job never started")
    time.sleep(0.4)  # ~25 tokens in
    first = read_events(api, result_id, stop_after=3)  # then the connection drops
    assert [e.id for e in first] == [1, 2, 3] and all(e.event == "token" for e in first)
    rest = read_events(api, result_id, last_event_id=3)
    _check_sequence(rest, first_id=4)
    final = rest[-1].data
    assert final["status"] == "completed" and text_of(first) + text_of(rest) == final["output"]

    # After the end: everything at once, and a resume after the last token gives only `done`.
    again = read_events(api, result_id)
    _check_sequence(again)
    assert text_of(again) == final["output"] and again[-1].data == final
    last_token, done_id = again[-2].id, again[-1].id
    assert [e.event for e in read_events(api, result_id, last_event_id=last_token)] == ["done"]
    # A resume from the end marker, or from past it, gets the end again under its own id.
    for resume in (done_id, done_id + 1000, 2**63 - 1):
        assert [(e.event, e.id) for e in read_events(api, result_id, last_event_id=resume)] == [
            ("done", done_id)
        ]
    # An id Redis cannot hold is refused, not taken for an outage.
    refused = api.get(f"/results/{result_id}/stream", headers={"Last-Event-ID": str(2**64)})
    assert refused.status_code == 422 and refused.json()["detail"][0]["field"] == "header.Last-Event-ID"


def test_a_resume_past_the_end_of_a_running_job_ends_with_the_real_done_id(api: httpx.Client) -> None:
    result_id = send(api, SLOW_MODEL, create_context(api, "Stream this, from afar."), STREAMED)
    ahead = read_events(api, result_id, last_event_id=10_000)
    whole = read_events(api, result_id)
    _check_sequence(whole)
    assert [(e.event, e.id) for e in ahead] == [("done", whole[-1].id)]


def test_a_job_sent_without_stream_gives_its_whole_text_when_it_ends(api: httpx.Client) -> None:
    result_id = send(
        api, FAST_MODEL, create_context(api, "Not streamed."), {"max_tokens": 12, "ignore_eos": True}
    )
    events = read_events(api, result_id)
    assert [(e.event, e.id) for e in events] == [("token", 1), ("done", 2)]
    assert events[0].data["text"] == events[1].data["output"] and events[1].data["status"] == "completed"


def test_the_stream_of_another_tenants_job_is_a_404(api: httpx.Client, api_server: str) -> None:
    result_id = send(api, FAST_MODEL, create_context(api, "Mine."), {"max_tokens": 2})
    from tests.conftest import ADMIN_KEY, bearer

    with httpx.Client(base_url=api_server, timeout=30) as http:
        made = http.post(
            "/admin/keys", json={"tenant": "other-streams", "name": "t"}, headers=bearer(ADMIN_KEY)
        )
        other = bearer(made.json()["key"])
        missing = http.get(f"/results/{result_id}/stream", headers=other)
        assert missing.status_code == 404 and "not found" in missing.json()["error"]
        assert http.get(f"/results/{result_id}/stream").status_code == 401
    bad = api.get(f"/results/{result_id}/stream", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 422 and "Last-Event-ID" in bad.text


def test_cancelling_a_streamed_job_keeps_what_it_had_written_and_frees_the_engine(
    api: httpx.Client, triton: Any
) -> None:
    running = lambda: read_metric(triton, "sim_engine_running_requests", SLOW_MODEL)  # noqa: E731
    params = {**STREAMED, "max_tokens": 480}  # ~7 s if nothing stops it
    result_id = send(api, SLOW_MODEL, create_context(api, "Talk, then stop."), params)
    seen = read_events(api, result_id, stop_after=10)  # it is generating
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long_poll = pool.submit(api.get, f"/results/{result_id}", params={"wait": 30})
        time.sleep(0.3)
        cancelled = api.post(f"/results/{result_id}/cancel")
        polled = long_poll.result(timeout=30)
    assert cancelled.status_code == 200, cancelled.text
    # A long poll the cancel ended answers with the row that keeps the text, as the cancel does.
    assert polled.status_code == 200 and polled.json() == cancelled.json()
    _until(lambda: running() == 0, 5, "the engine still runs the sequence")
    events = read_events(api, result_id)
    final = events[-1].data
    assert final["status"] == "cancelled" and final["error"] == "cancelled by the client"
    assert final["finish_reason"] == "abort"
    # What it wrote before the cancel is on the row, and it is what the stream carried.
    assert final["output"] and final["output"].startswith(text_of(seen))
    assert text_of(events) == final["output"]
    assert 10 <= final["completion_tokens"] < 480 and final["prompt_tokens"] > 0
    # The cancel's answer already had it (the API waits a moment for the worker to record it).
    assert cancelled.json()["output"] and final["output"].startswith(cancelled.json()["output"])


def test_a_job_past_its_timeout_ends_cancelled_and_its_generation_is_aborted(
    api: httpx.Client, triton: Any
) -> None:
    running = lambda: read_metric(triton, "sim_engine_running_requests", SLOW_MODEL)  # noqa: E731
    params = {**STREAMED, "max_tokens": 480, "timeout_s": 1.5}
    result_id = send(api, SLOW_MODEL, create_context(api, "Too long."), params)
    final = wait_for_result(api, result_id, timeout_s=10)
    assert final["status"] == "cancelled", final
    assert final["error"] == "deadline passed: not finished within timeout_s = 1.5 s of its submission"
    assert final["finish_reason"] == "abort" and final["output"] and 0 < final["completion_tokens"] < 480
    _until(lambda: running() == 0, 5, "the engine still runs the sequence")
    assert text_of(read_events(api, result_id)) == final["output"]


def test_a_job_whose_deadline_passed_in_the_queue_never_runs(
    api: httpx.Client, e2e_env: dict[str, str]
) -> None:
    context_id = create_context(api, "Too late.")
    engine = create_engine(e2e_env["DATABASE_URL"])
    with engine.begin() as conn:  # queued, its deadline passed, its doorbell not rung yet
        rows = [
            str(
                conn.execute(
                    text(
                        "INSERT INTO result (id, tenant, context_id, model, params, deadline_at) VALUES "
                        "(gen_random_uuid(), (SELECT tenant FROM context WHERE id = :c), :c, :m, "
                        "'{\"max_tokens\": 4, \"timeout_s\": 0.1}', now() - interval '1 second') RETURNING id"
                    ),
                    {"c": context_id, "m": FAST_MODEL},
                ).scalar_one()
            )
            for _ in range(2)
        ]
    ring(e2e_env["CELERY_QUEUE"], rows[0])  # the worker sees the deadline at its claim
    for result_id in rows:  # the other one is ended by the sweeper
        final = wait_for_result(api, result_id, timeout_s=20)
        assert final["status"] == "cancelled" and final["output"] is None, final
        assert final["error"] == "deadline passed: not finished within timeout_s = 0.1 s of its submission"
    engine.dispose()


def test_timeout_s_is_bounded_by_the_platform_deadline(api: httpx.Client) -> None:
    context_id = create_context(api, "Bounds.")
    for bad in (0, -1, "soon"):
        response = api.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"timeout_s": bad})
        assert response.status_code == 422 and "timeout_s" in response.text
    too_long = api.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"timeout_s": 100_000})
    assert too_long.status_code == 422 and "timeout_s" in too_long.text


@pytest.fixture(scope="module")
def second_api_and_worker(e2e_env: dict[str, str], logs_dir: Path, worker: object) -> Iterator[str]:
    """Another API process and another worker process on the same Postgres, Redis and queue."""
    from devstack.processes import api_process, free_port, worker_process

    port = free_port()
    second_worker = worker_process(e2e_env, logs_dir / "worker-2.log").start()
    second_api = api_process(e2e_env, logs_dir / "api-2.log", port=port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        second_worker.wait_for_log("ready.", timeout_s=60)
        second_api.wait_for_http(f"{url}/health", timeout_s=30)
        yield url
    finally:
        second_api.stop()
        second_worker.stop()


def test_streams_work_across_two_api_processes_and_two_workers(
    api: httpx.Client, second_api_and_worker: str, e2e_env: dict[str, str]
) -> None:
    with httpx.Client(base_url=second_api_and_worker, headers=api.headers, timeout=30) as api_2:
        params = {**STREAMED, "max_tokens": 40}
        jobs = [send(api, SLOW_MODEL, create_context(api, f"Job {i}."), params) for i in range(12)]
        # Each stream read half through one API process, and resumed through the other.
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            firsts = list(pool.map(lambda rid: read_events(api_2, rid, stop_after=2), jobs))
            rests = list(
                pool.map(lambda rid, first: read_events(api, rid, last_event_id=first[-1].id), jobs, firsts)
            )
    for first, rest in zip(firsts, rests, strict=True):
        _check_sequence(first + rest)
        assert rest[-1].data["status"] == "completed"
        assert text_of(first) + text_of(rest) == rest[-1].data["output"]
    engine = create_engine(e2e_env["DATABASE_URL"])
    with engine.connect() as conn:
        owners = conn.execute(
            text("SELECT count(DISTINCT lease_owner) FROM result WHERE id = ANY(:ids)"), {"ids": jobs}
        ).scalar_one()
    engine.dispose()
    assert owners == 2  # both workers ran some of them
