"""Long poll: GET /results/{id}?wait=N answers when the worker finishes the job."""

from __future__ import annotations

import time

import httpx
from localtriton.engine import simulate
from sqlalchemy import create_engine, text

from tests.conftest import FAST_MODEL, SLOW_MODEL
from tests.e2e.helpers import create_context, send


def test_wait_answers_as_soon_as_the_job_finishes(api: httpx.Client) -> None:
    prompt = "Take your time."
    context_id = create_context(api, prompt)
    # ~40 tokens at 15 ms each on the slow model: pending when the request arrives.
    params = {"max_tokens": 40, "seed": 3, "temperature": 1}
    result_id = send(api, SLOW_MODEL, context_id, params)
    started = time.monotonic()
    response = api.get(f"/results/{result_id}", params={"wait": 30}, timeout=40)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "completed"
    assert body["output"] == simulate(prompt, params, 512).text
    # Woken by the worker's notice, not by the 30 s timeout.
    assert elapsed < 15, elapsed


def test_wait_gives_up_with_the_job_still_pending(api: httpx.Client, e2e_env: dict[str, str]) -> None:
    engine = create_engine(e2e_env["DATABASE_URL"])
    context_id = create_context(api, "never sent")
    with engine.begin() as conn:  # pending and not enqueued: nothing will finish it within 1 s
        result_id = str(
            conn.execute(
                text(
                    "INSERT INTO result (id, tenant, context_id, model) VALUES (gen_random_uuid(), (SELECT tenant FROM context WHERE id = :c), :c, :m) RETURNING id"
                ),
                {"c": context_id, "m": FAST_MODEL},
            ).scalar_one()
        )
    engine.dispose()
    started = time.monotonic()
    response = api.get(f"/results/{result_id}", params={"wait": 1})
    assert response.status_code == 200
    assert response.json()["status"] == "pending"
    assert time.monotonic() - started >= 1


def test_finished_job_answers_at_once_and_bad_wait_is_422(api: httpx.Client) -> None:
    context_id = create_context(api, "quick")
    result_id = send(api, FAST_MODEL, context_id, {"max_tokens": 2})
    assert api.get(f"/results/{result_id}", params={"wait": 30}).json()["status"] == "completed"
    for bad in ("-1", "61", "soon"):
        response = api.get(f"/results/{result_id}", params={"wait": bad})
        assert response.status_code == 422
        assert "query.wait" in response.json()["error"]
