"""Cancel: a queued job never runs, a running one is aborted in the engine, a finished one stays."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from tests.conftest import FAST_MODEL, SLOW_MODEL
from tests.e2e.helpers import create_context, ring, send, wait_for_result
from tests.localtriton.localtriton_helpers import read_metric


def _until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_cancelled_queued_job_never_runs(api: httpx.Client, e2e_env: dict[str, str]) -> None:
    context_id = create_context(api, "Never mind.")
    engine = create_engine(e2e_env["DATABASE_URL"])
    with engine.begin() as conn:  # pending, its doorbell not rung yet
        result_id = str(
            conn.execute(
                text(
                    "INSERT INTO result (id, tenant, context_id, model, params) VALUES (gen_random_uuid(), "
                    "(SELECT tenant FROM context WHERE id = :c), :c, :m, '{\"max_tokens\": 4}') RETURNING id"
                ),
                {"c": context_id, "m": FAST_MODEL},
            ).scalar_one()
        )
    cancelled = api.post(f"/results/{result_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert (
        cancelled.json()["status"] == "cancelled" and cancelled.json()["error"] == "cancelled by the client"
    )
    assert cancelled.json()["finish_reason"] is None  # it never generated anything
    ring(e2e_env["CELERY_QUEUE"], result_id)  # the doorbell arrives late (or twice): nothing runs
    time.sleep(2)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, attempts, started_at FROM result WHERE id = :i"), {"i": result_id}
        ).one()
    engine.dispose()
    assert tuple(row) == ("cancelled", 0, None)


def test_cancelling_a_running_job_frees_its_engine_sequence(api: httpx.Client, triton: Any) -> None:
    running = lambda: read_metric(triton, "sim_engine_running_requests", SLOW_MODEL)  # noqa: E731
    aborted_before = read_metric(triton, "sim_engine_cancelled_total", SLOW_MODEL)
    # 480 tokens at 15 ms each (the simulated model's context is 512): ~7 s if nothing stops it.
    params = {"max_tokens": 480, "ignore_eos": True}
    result_id = send(api, SLOW_MODEL, create_context(api, "Talk for a long time."), params)
    _until(
        lambda: running() >= 1,
        20,
        f"the job never started in the engine: {api.get(f'/results/{result_id}').json()}",
    )
    # Cancelled in its first ~0.1 s, tritonserver 2.51 sometimes loses a stream's cancel (the row is
    # cancelled all the same, the engine runs on): let it generate a little first.
    time.sleep(0.5)
    started = time.monotonic()
    cancelled = api.post(f"/results/{result_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finish_reason"] == "abort"  # as a job past its deadline ends
    aborted = lambda: read_metric(triton, "sim_engine_cancelled_total", SLOW_MODEL)  # noqa: E731
    _until(
        lambda: running() == 0 and aborted() == aborted_before + 1,
        5,
        f"the engine still runs the sequence ({running()} running, {aborted()} cancelled, {aborted_before} before)",
    )
    assert time.monotonic() - started < 5  # well before its ~7 s end
    final = api.get(f"/results/{result_id}", params={"wait": 5}).json()
    assert final["status"] == "cancelled" and final["finished_at"]


def test_a_finished_job_cannot_be_cancelled_and_a_cancel_repeats(api: httpx.Client) -> None:
    done_id = send(api, FAST_MODEL, create_context(api, "Quick."), {"max_tokens": 2})
    assert wait_for_result(api, done_id)["status"] == "completed"
    refused = api.post(f"/results/{done_id}/cancel")
    assert refused.status_code == 409
    assert (
        refused.json()["error"]
        == f"result {done_id} is already completed: only a pending job can be cancelled"
    )
    assert api.get(f"/results/{done_id}").json()["status"] == "completed"

    slow_id = send(api, SLOW_MODEL, create_context(api, "Slowly."), {"max_tokens": 400, "ignore_eos": True})
    first = api.post(f"/results/{slow_id}/cancel")
    again = api.post(f"/results/{slow_id}/cancel")
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert api.post(f"/results/{done_id[:-4]}beef/cancel").status_code == 404


def test_a_streamed_job_cancelled_as_it_ends_keeps_the_text_its_stream_showed(
    api: httpx.Client, e2e_env: dict[str, str]
) -> None:
    """The cancel commits while the worker's completion waits for the row (held locked here): the
    completion then finds the job cancelled, and the row keeps the whole text rather than none."""
    from app.repositories.results import _CANCEL

    params = {"max_tokens": 20, "ignore_eos": True, "stream": True}
    result_id = send(api, SLOW_MODEL, create_context(api, "Say twenty words."), params)
    engine = create_engine(e2e_env["DATABASE_URL"])
    try:
        with engine.connect() as lock:
            _until(
                lambda: lock.execute(
                    text("SELECT started_at IS NOT NULL FROM result WHERE id = :i"), {"i": result_id}
                ).scalar_one(),
                20,
                "the job never started",
            )
            lock.commit()
            lock.execute(text("SELECT 1 FROM result WHERE id = :i FOR UPDATE"), {"i": result_id})
            pieces: list[str] = []
            with api.stream("GET", f"/results/{result_id}/stream") as stream:
                for line in stream.iter_lines():  # the 20 tokens come; `done` waits for the row
                    if line.startswith("data:"):
                        pieces.append(json.loads(line[5:])["text"])
                    if len(pieces) == 20:
                        break
            streamed = "".join(pieces)
            time.sleep(0.5)  # the worker's completion is waiting for the lock by now
            lock.exec_driver_sql(_CANCEL, {"id": result_id, "tenant": None})
            lock.commit()
        final = lambda: api.get(f"/results/{result_id}").json()  # noqa: E731
        _until(lambda: final()["finish_reason"] is not None, 10, f"the text was not kept: {final()}")
    finally:
        engine.dispose()
    row = final()
    assert row["status"] == "cancelled" and row["error"] == "cancelled by the client"
    assert (row["output"], row["completion_tokens"], row["finish_reason"]) == (streamed, 20, "abort")
