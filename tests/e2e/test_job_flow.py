"""End to end: a real uvicorn API, a real Celery worker (its job pool, Redis broker), the real
tritonserver with the simulated vLLM backend, and Postgres."""

from __future__ import annotations

import re
import time
from datetime import datetime

import httpx
from localtriton.engine import simulate
from sqlalchemy import create_engine, text

from tests.conftest import FAST_MODEL, SLOW_MODEL
from tests.e2e.helpers import create_context, ring, send, wait_for_result

SIM_MAX_MODEL_LEN = 512


def test_full_flow_completes_with_the_simulated_text(api: httpx.Client) -> None:
    prompt = "Explain in one paragraph why batching matters for LLM inference."
    params = {"max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 7}
    context_id = create_context(api, prompt)
    result_id = send(api, FAST_MODEL, context_id, params)

    result = wait_for_result(api, result_id)

    expected = simulate(prompt, {**params, "stop": []}, SIM_MAX_MODEL_LEN)
    assert result["status"] == "completed", result
    assert result["output"] == expected.text
    assert result["output"]  # the simulator produced words, not an empty string
    assert result["finish_reason"] == expected.finish_reason
    assert result["prompt_tokens"] == expected.prompt_tokens == 11
    assert result["completion_tokens"] == expected.completion_tokens
    assert result["error"] is None
    assert result["attempts"] == 1
    created, started, finished = (
        datetime.fromisoformat(result[k]) for k in ("created_at", "started_at", "finished_at")
    )
    assert created <= started <= finished


def test_same_seed_gives_same_text_and_stop_strings_cut(api: httpx.Client) -> None:
    prompt = "Write a list of words."
    context_id = create_context(api, prompt)
    first = wait_for_result(
        api, send(api, FAST_MODEL, context_id, {"max_tokens": 40, "seed": 1, "temperature": 1})
    )
    second = wait_for_result(
        api, send(api, FAST_MODEL, context_id, {"max_tokens": 40, "seed": 1, "temperature": 1})
    )
    assert first["output"] == second["output"]
    # Stop at the first "the" of the unconstrained text: the output ends just before it.
    words = first["output"].split()
    stop_word = next(w for w in words[2:] if re.fullmatch(r"[a-z]+", w))
    stopped = wait_for_result(
        api,
        send(
            api, FAST_MODEL, context_id, {"max_tokens": 40, "seed": 1, "temperature": 1, "stop": [stop_word]}
        ),
    )
    expected = simulate(
        prompt, {"max_tokens": 40, "seed": 1, "temperature": 1, "top_p": 1.0, "stop": [stop_word]}, 512
    )
    assert stopped["output"] == expected.text
    assert stop_word not in stopped["output"].split()
    assert stopped["finish_reason"] == "stop"


def test_max_tokens_bounds_the_output(api: httpx.Client) -> None:
    context_id = create_context(api, "Count to a thousand.")
    result = wait_for_result(api, send(api, FAST_MODEL, context_id, {"max_tokens": 3, "temperature": 0}))
    expected = simulate("Count to a thousand.", {"max_tokens": 3, "temperature": 0}, 512)
    assert result["completion_tokens"] == expected.completion_tokens <= 3
    assert result["output"] == expected.text


def test_backend_error_fails_the_job_with_its_message_without_retrying(api: httpx.Client) -> None:
    # 600 tokens do not fit the simulated model's 512-token context: vLLM refuses such a request.
    prompt = "word " * 600
    context_id = create_context(api, prompt)
    result = wait_for_result(api, send(api, FAST_MODEL, context_id, {"max_tokens": 16}))
    assert result["status"] == "failed"
    assert (
        "maximum model length of 512" in result["error"] or "maximum context length is 512" in result["error"]
    )
    assert not result["error"].startswith("Error generating stream")  # the backend's prefix says nothing
    assert result["output"] is None
    assert result["attempts"] == 1  # permanent: not retried
    assert result["finished_at"] is not None


def test_completion_too_long_for_context_fails_clearly(api: httpx.Client) -> None:
    context_id = create_context(api, "short prompt")
    result = wait_for_result(api, send(api, FAST_MODEL, context_id, {"max_tokens": 600}))
    assert result["status"] == "failed"
    assert (
        "This model's maximum context length is 512 tokens. However, you requested 602 tokens"
        in result["error"]
    )


def test_redelivered_task_after_completion_changes_nothing(
    api: httpx.Client, e2e_env: dict[str, str], worker: object
) -> None:

    context_id = create_context(api, "Say something once.")
    result_id = send(api, FAST_MODEL, context_id, {"max_tokens": 8, "seed": 5})
    done = wait_for_result(api, result_id)
    assert done["status"] == "completed"

    log_path = worker.log_path  # type: ignore[attr-defined]
    for _ in range(3):  # as if Redis redelivered the message
        ring(e2e_env["CELERY_QUEUE"], result_id)
    deadline = time.monotonic() + 20
    while log_path.read_text().count(f"result {result_id} is finished or held by another worker") < 3:
        assert time.monotonic() < deadline, "the worker did not process the redelivered messages"
        time.sleep(0.1)
    assert api.get(f"/results/{result_id}").json() == done


def test_duplicate_messages_for_one_job_call_the_model_once(
    api: httpx.Client, e2e_env: dict[str, str]
) -> None:

    engine = create_engine(e2e_env["DATABASE_URL"])
    context_id = create_context(api, "Only one of you may answer.")
    # A row committed without the API's enqueue, then five copies of its message at once.
    with engine.begin() as conn:
        result_id = str(
            conn.execute(
                text(
                    "INSERT INTO result (id, tenant, context_id, model, params) VALUES (gen_random_uuid(), (SELECT tenant FROM context WHERE id = :c), :c, :m, "
                    '\'{"max_tokens": 16, "seed": 2, "temperature": 1}\') RETURNING id'
                ),
                {"c": context_id, "m": SLOW_MODEL},
            ).scalar_one()
        )
    engine.dispose()
    for _ in range(5):
        ring(e2e_env["CELERY_QUEUE"], result_id)
    result = wait_for_result(api, result_id)
    assert result["status"] == "completed"
    assert result["attempts"] == 1  # one claim won; the other four skipped the running job
    assert (
        result["output"]
        == simulate("Only one of you may answer.", {"max_tokens": 16, "seed": 2, "temperature": 1}, 512).text
    )


def test_lost_message_is_recovered_by_the_sweeper(api: httpx.Client, e2e_env: dict[str, str]) -> None:
    engine = create_engine(e2e_env["DATABASE_URL"])
    context_id = create_context(api, "Nobody rang the doorbell.")
    with engine.begin() as conn:  # committed, never enqueued: as if Redis lost the message
        result_id = str(
            conn.execute(
                text(
                    "INSERT INTO result (id, tenant, context_id, model, params) VALUES (gen_random_uuid(), (SELECT tenant FROM context WHERE id = :c), :c, :m, "
                    '\'{"max_tokens": 5, "temperature": 0}\') RETURNING id'
                ),
                {"c": context_id, "m": FAST_MODEL},
            ).scalar_one()
        )
    engine.dispose()
    # SWEEP_REQUEUE_AFTER_S=3 and SWEEP_INTERVAL_S=1 in the test worker.
    result = wait_for_result(api, result_id, timeout_s=30)
    assert result["status"] == "completed"
    assert (
        result["output"]
        == simulate("Nobody rang the doorbell.", {"max_tokens": 5, "temperature": 0}, 512).text
    )


def test_worker_keeps_many_requests_in_flight(
    api: httpx.Client, e2e_env: dict[str, str], triton: object
) -> None:
    # 64 jobs on the slow model (20 ms prefill, 15 ms per token): one at a time would take ~30 s.
    # Rows and doorbells are written directly so that the submit rate cannot be what limits the peak.
    prompt = "Keep the GPU busy."
    context_id = create_context(api, prompt)
    engine = create_engine(e2e_env["DATABASE_URL"])
    with engine.begin() as conn:
        ids = [
            str(
                conn.execute(
                    text(
                        "INSERT INTO result (id, tenant, context_id, model, params) VALUES (gen_random_uuid(), (SELECT tenant FROM context WHERE id = :c), :c, :m, "
                        "CAST(:p AS jsonb)) RETURNING id"
                    ),
                    {
                        "c": context_id,
                        "m": SLOW_MODEL,
                        "p": f'{{"max_tokens": 64, "seed": {i}, "temperature": 1}}',
                    },
                ).scalar_one()
            )
            for i in range(64)
        ]
    engine.dispose()
    started = time.monotonic()
    for rid in ids:
        ring(e2e_env["CELERY_QUEUE"], rid)
    results = [wait_for_result(api, rid, timeout_s=60) for rid in ids]
    elapsed = time.monotonic() - started
    assert all(r["status"] == "completed" for r in results), [r["error"] for r in results if r["error"]]
    for i, r in enumerate(results):
        assert r["output"] == simulate(prompt, {"max_tokens": 64, "seed": i, "temperature": 1}, 512).text
    metrics = httpx.get(triton.metrics_url).text  # type: ignore[attr-defined]
    match = re.search(
        rf'sim_engine_peak_running_requests\{{[^}}]*model="{SLOW_MODEL}"[^}}]*\}} (\S+)', metrics
    )
    assert match, metrics[:2000]
    peak = float(match.group(1))
    print(f"64 jobs in {elapsed:.2f}s, peak running sequences in the engine: {peak:.0f}")
    assert peak >= 48, f"the worker held at most {peak:.0f} requests in flight"


def test_prefer_wait_answers_with_the_final_row_when_the_job_ends_in_time(api: httpx.Client) -> None:
    context_id = create_context(api, "Answer while I wait.")
    quick = api.post(
        f"/models/send/{FAST_MODEL}/{context_id}",
        json={"max_tokens": 4, "seed": 2},
        headers={"Prefer": "wait=10"},
    )
    assert quick.status_code == 200, quick.text
    assert quick.json()["status"] == "completed" and quick.json()["output"]
    assert quick.headers["preference-applied"] == "wait=10"
    assert quick.headers["location"] == f"/results/{quick.json()['id']}"

    slow = api.post(
        f"/models/send/{SLOW_MODEL}/{context_id}",
        json={"max_tokens": 300, "ignore_eos": True},  # ~4.5 s, whatever the sampled text
        headers={"Prefer": "wait=1"},
    )
    assert slow.status_code == 202 and slow.json()["status"] == "pending"
    for bad in ("wait=61", "wait=-1", "wait=abc", "wait", "respond-async, wait=1e3"):
        refused = api.post(f"/models/send/{FAST_MODEL}/{context_id}", headers={"Prefer": bad})
        assert refused.status_code == 422, (bad, refused.text)
        assert "is not a number of seconds from 0 to 60" in refused.json()["error"], bad
    # Preference names are case-insensitive (RFC 7240), with whitespace around "=" and others beside.
    spelled = api.post(
        f"/models/send/{FAST_MODEL}/{context_id}",
        json={"max_tokens": 4},
        headers={"Prefer": "respond-async, WAIT = 10"},
    )
    assert spelled.status_code == 200 and spelled.json()["status"] == "completed", spelled.text

    # With an Idempotency-Key too, and on its replay: the same job's final row.
    keyed = {"Prefer": "wait=10", "Idempotency-Key": f"wait-{context_id}"}
    first = api.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4}, headers=keyed)
    again = api.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4}, headers=keyed)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.json() == again.json() and first.json()["status"] == "completed"
    assert first.headers["preference-applied"] == "wait=10"


def test_chat_with_an_idempotency_key_renders_the_template(api: httpx.Client) -> None:
    context_id = create_context(api, "Once, with the template.")
    headers = {"Idempotency-Key": f"chat-{context_id}"}
    first = api.post(
        f"/models/send/{FAST_MODEL}/{context_id}", json={"chat": True, "max_tokens": 3}, headers=headers
    )
    again = api.post(
        f"/models/send/{FAST_MODEL}/{context_id}", json={"chat": True, "max_tokens": 3}, headers=headers
    )
    assert first.status_code == again.status_code == 202, first.text
    assert first.json()["result_id"] == again.json()["result_id"]
    assert wait_for_result(api, first.json()["result_id"])["status"] == "completed"
