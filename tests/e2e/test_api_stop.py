"""An API process stopped (SIGTERM, as a rolling deploy does) answers the requests that wait at once,
in the API's own shapes, instead of cutting them at the server's graceful timeout (a plain-text 500
for a long poll, a stream ended mid-body): no worker serves this test's queue, so its jobs stay pending."""

from __future__ import annotations

import json
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from devstack.processes import api_process, free_port

from tests.conftest import ADMIN_KEY, FAST_MODEL, bearer

GRACEFUL_S = 5  # the server's --timeout-graceful-shutdown (devstack's): the waits end well before


def _stream_events(url: str, result_id: str) -> tuple[float, list[tuple[str, str]]]:
    """(when the stream ended, its events as (name, data))."""
    events: list[tuple[str, str]] = []
    name = "message"
    with httpx.stream(
        "GET", f"{url}/results/{result_id}/stream", headers=bearer(ADMIN_KEY), timeout=60
    ) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, line.removeprefix("data: ")))
                name = "message"
    return time.monotonic(), events


def _timed(call: Any) -> tuple[float, httpx.Response]:
    response = call()
    return time.monotonic(), response


def test_a_stopped_api_answers_its_long_polls_streams_and_waiting_calls_at_once(
    e2e_env: dict[str, str], logs_dir: Path
) -> None:
    env = {**e2e_env, "CELERY_QUEUE": f"unserved-{uuid.uuid4().hex[:8]}"}
    port = free_port()
    log_path = logs_dir / "api-stop.log"
    proc = api_process(env, log_path, port=port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_for_http(f"{url}/health", timeout_s=30)
        admin = httpx.Client(base_url=url, headers=bearer(ADMIN_KEY), timeout=60)
        context_id = admin.post("/contexts/", json={"content": "wait for me"}).json()["id"]
        polled, streamed = (
            admin.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"stream": stream}).json()["result_id"]
            for stream in (False, True)
        )
        with ThreadPoolExecutor(4) as pool:
            poll = pool.submit(_timed, lambda: admin.get(f"/results/{polled}", params={"wait": 60}))
            stream = pool.submit(_stream_events, url, streamed)
            call = pool.submit(
                _timed,
                lambda: admin.post(
                    "/v1/completions", json={"model": FAST_MODEL, "prompt": "hi", "max_tokens": 4}
                ),
            )
            time.sleep(1.5)  # all three waiting
            assert not (poll.done() or stream.done() or call.done())
            assert proc.popen is not None
            proc.popen.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()

            answered_at, long_poll = poll.result(timeout=30)
            assert long_poll.status_code == 200, long_poll.text
            assert long_poll.json()["id"] == polled and long_poll.json()["status"] == "pending"
            assert answered_at - stopped_at < 2

            ended_at, events = stream.result(timeout=30)
            assert events and events[-1][0] == "error", events
            error = json.loads(events[-1][1])
            assert error["detail"] == {"status": 503, "last_event_id": 0}
            assert "stopping" in error["error"]
            assert ended_at - stopped_at < 2

            answered_at, completion = call.result(timeout=30)
            assert completion.status_code == 503, completion.text
            assert "stopping" in completion.json()["error"]["message"]
            assert answered_at - stopped_at < 2

        # uvicorn ends by the signal it was stopped with, once shut down (its exit status says so).
        assert proc.popen.wait(timeout=GRACEFUL_S + 5) in (0, -signal.SIGTERM)
        assert time.monotonic() - stopped_at < GRACEFUL_S  # no request held the server to its timeout
        log = log_path.read_text(errors="replace")
        assert "Traceback" not in log and "graceful shutdown exceeded" not in log
    finally:
        proc.stop()
