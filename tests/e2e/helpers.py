from __future__ import annotations

import base64
import functools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis

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


def queued_jobs(redis_url: str, queue: str) -> list[list[str]]:
    """The result ids of each `run_jobs` message waiting in `queue`, oldest message first."""
    raw = redis.Redis.from_url(redis_url).lrange(queue, 0, -1)
    return [
        json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in reversed(raw)
    ]  # LPUSH: newest first


def ring(queue: str, *result_ids: str) -> None:
    """Publish `run_job` messages for rows written by the test (redeliveries, duplicates, lost doorbells)."""
    assert _job_queue(queue).ring([uuid.UUID(rid) for rid in result_ids])


@dataclass
class Event:
    event: str
    id: int
    data: Any
    received_at: float


def read_events(
    api: httpx.Client,
    result_id: str,
    *,
    last_event_id: int | None = None,
    stop_after: int | None = None,
    on_event: Callable[[Event], None] | None = None,
    timeout_s: float = 30.0,
) -> list[Event]:
    """Read `GET /results/{id}/stream` as an EventSource client would: until `done`, or after
    `stop_after` events (then the connection is dropped)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[Event] = []
    with api.stream("GET", f"/results/{result_id}/stream", headers=headers, timeout=timeout_s) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            if "event" not in fields:
                continue
            event = Event(fields["event"], int(fields["id"]), json.loads(fields["data"]), time.monotonic())
            fields = {}
            events.append(event)
            if on_event is not None:
                on_event(event)
            if event.event == "done" or (stop_after is not None and len(events) >= stop_after):
                break
    return events


def text_of(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "token")
