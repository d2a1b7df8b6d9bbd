"""GET /metrics: the API process's answers and the queue's state, for an admin key's scraper."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FAST_MODEL, EnqueueRecorder, InProcessApi, failing_on_demand

pytestmark = pytest.mark.anyio


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_every_answer_and_read_the_queue(
    api_app: InProcessApi, db: psycopg.AsyncConnection[Any]
) -> None:
    before = _samples((await api_app.admin.get("/metrics")).text)
    context_id = (await api_app.user.post("/contexts/", json={"content": "count me"})).json()["id"]
    for _ in range(2):
        assert (await api_app.user.post(f"/models/send/{FAST_MODEL}/{context_id}")).status_code == 202
    assert (await api_app.http.get(f"/results/{context_id}")).status_code == 401  # no key
    assert (await api_app.user.get(f"/results/{context_id}", params={"wiat": 1})).status_code == 422
    assert (await api_app.user.get("/metrics")).status_code == 403  # a user key
    assert (await api_app.http.get("/metrics")).status_code == 401

    answer = await api_app.admin.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    after = _samples(answer.text)

    def grew(labels: dict[str, str]) -> float:
        key = ("llmq_http_requests_total", tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew({"method": "POST", "group": "contexts", "status": "201"}) == 1
    assert grew({"method": "POST", "group": "models", "status": "202"}) == 2
    assert grew({"method": "GET", "group": "results", "status": "401"}) == 1
    assert grew({"method": "GET", "group": "results", "status": "422"}) == 1
    assert grew({"method": "GET", "group": "metrics", "status": "403"}) == 1
    count = ("llmq_http_response_head_seconds_count", (("group", "models"), ("method", "POST")))
    assert after[count] - before.get(count, 0) == 2

    # The queue as Postgres has it (no worker here: the jobs wait), every tenant's.
    row = await (
        await db.execute("SELECT count(*) FROM result WHERE status = 'pending' AND model = %s", (FAST_MODEL,))
    ).fetchone()
    assert row is not None and row[0] >= 2
    assert after[("llmq_jobs_pending", (("model", FAST_MODEL), ("state", "queued")))] == row[0]
    assert after[("llmq_oldest_queued_job_age_seconds", (("model", FAST_MODEL),))] > 0
    assert not any("result_id" in dict(labels) or "id" in dict(labels) for _, labels in after)


async def test_metrics_labels_stay_bounded_whatever_the_paths_and_methods(api_app: InProcessApi) -> None:
    for path in ("/nope/1", "/nope/2", "/%00", "/contexts/abc/def"):
        await api_app.user.request("BREW", path)
    text = (await api_app.admin.get("/metrics")).text
    groups = {
        dict(labels)["group"] for (name, labels) in _samples(text) if name == "llmq_http_requests_total"
    }
    methods = {
        dict(labels)["method"] for (name, labels) in _samples(text) if name == "llmq_http_requests_total"
    }
    assert groups <= {"contexts", "models", "results", "admin", "health", "v1", "metrics", "other"}
    assert "BREW" not in methods and "other" in methods


async def test_an_unexpected_error_is_counted_500_and_an_empty_queue_reads_zero(
    triton: Any, enqueued: EnqueueRecorder, db: psycopg.AsyncConnection[Any]
) -> None:
    async with failing_on_demand(triton.http_url, enqueued) as admin:
        context_id = (await admin.post("/contexts/", json={"content": "count me"})).json()["id"]
        assert (await admin.post(f"/models/send/{FAST_MODEL}/{context_id}")).status_code == 202
        assert (await admin.get("/contexts/", headers={"x-fail": "1"})).status_code == 500
        first = _samples((await admin.get("/metrics")).text)
        await db.execute("UPDATE result SET status = 'failed', finished_at = now()")
        second = _samples((await admin.get("/metrics")).text)
    assert (
        first[("llmq_http_requests_total", (("group", "contexts"), ("method", "GET"), ("status", "500")))]
        == 1
    )
    queued = ("llmq_jobs_pending", (("model", FAST_MODEL), ("state", "queued")))
    assert first[queued] == 1 and second[queued] == 0  # still there, at 0
    assert second[("llmq_oldest_queued_job_age_seconds", (("model", FAST_MODEL),))] == 0
