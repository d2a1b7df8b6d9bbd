from __future__ import annotations

import functools
import time
import uuid
from typing import Any

import httpx

from app.config import get_settings
from app.queue import JobQueue, make_celery


def wait_for_result(api: httpx.Client, result_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = api.get(f"/results/{result_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] != "pending":
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"result {result_id} still pending after {timeout_s}s: {body}")
        time.sleep(0.05)


def create_context(api: httpx.Client, content: str) -> str:
    response = api.post("/contexts/", json={"content": content})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def send(api: httpx.Client, model: str, context_id: str, params: dict[str, Any] | None = None) -> str:
    response = api.post(f"/models/send/{model}/{context_id}", json=params)
    assert response.status_code == 202, response.text
    return str(response.json()["result_id"])


@functools.cache
def _job_queue(queue: str) -> JobQueue:
    return JobQueue(make_celery(get_settings()), queue)


def ring(queue: str, *result_ids: str) -> None:
    """Publish `run_job` messages for rows written by the test (redeliveries, duplicates, lost doorbells)."""
    assert _job_queue(queue).ring([uuid.UUID(rid) for rid in result_ids])
