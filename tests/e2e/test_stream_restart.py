"""A streamed job whose worker is killed mid-generation runs again on another worker, and its stream
says so: `event: restart`, after which the text is the job's output, whether the reader followed it
live, started later or resumed. An OpenAI stream, which cannot take back what it sent, ends with an
error instead of two texts run together. Real API, workers (one killed with SIGKILL), tritonserver,
Postgres and Redis, on a database and queue of their own."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from devstack.processes import ManagedProcess, api_process, free_port, worker_process
from localtriton.engine import simulate

from tests.conftest import ADMIN_KEY, E2E_DB, PG_BASE, SLOW_MODEL, bearer
from tests.db_utils import recreate_database
from tests.e2e.helpers import Event, create_context, read_events, send, text_of, wait_for_result

# Unseeded: the run after the kill writes another text than the one cut. 150 tokens at 15 ms each.
STREAMED = {"max_tokens": 150, "ignore_eos": True, "stream": True, "temperature": 1.0}


@dataclass
class Stack:
    url: str
    db_url: str
    env: dict[str, str]
    logs: Path
    workers: list[ManagedProcess] = field(default_factory=list)

    def add_worker(self) -> None:
        proc = worker_process(self.env, self.logs / f"restart-worker-{len(self.workers)}.log").start()
        proc.wait_for_log("ready.", timeout_s=60)
        self.workers.append(proc)

    def kill_the_worker_running(self, result_id: str, replace: bool = True) -> None:
        """SIGKILL of the worker holding the job's lease; another is started in its place (or later)."""
        with psycopg.connect(self.db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            row = conn.execute("SELECT lease_owner FROM result WHERE id = %s", (result_id,)).fetchone()
        assert row is not None and row[0], "nobody runs the job"
        [holder] = [w for w in self.workers if w.popen is not None and f":{w.popen.pid}:" in row[0]]
        assert holder.popen is not None
        os.killpg(holder.popen.pid, signal.SIGKILL)
        holder.popen.wait(timeout=10)
        self.workers.remove(holder)
        if replace:
            self.add_worker()


@pytest.fixture(scope="module")
def stack(e2e_env: dict[str, str], logs_dir: Path) -> Iterator[Stack]:
    db_url = recreate_database(PG_BASE, f"{E2E_DB}_restart")
    env = {
        **e2e_env,
        "DATABASE_URL": db_url,
        "CELERY_QUEUE": e2e_env["CELERY_QUEUE"] + "-restart",
        "LEASE_S": "3",  # a killed worker's job runs again 3-4 s later
        "LEASE_RENEW_S": "1",
    }
    port = free_port()
    api = api_process(env, logs_dir / "restart-api.log", port=port).start()
    built = Stack(f"http://127.0.0.1:{port}", db_url, env, logs_dir)
    try:
        for _ in range(2):
            built.add_worker()
        api.wait_for_http(f"{built.url}/health", timeout_s=30)
        yield built
    finally:
        api.stop()
        for proc in built.workers:
            proc.stop()


@pytest.fixture(scope="module")
def user_key(stack: Stack) -> str:
    answer = httpx.post(
        f"{stack.url}/admin/keys",
        json={"tenant": "restart", "name": "stream restart"},
        headers=bearer(ADMIN_KEY),
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["key"])


def _when(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_stream_cut_by_a_worker_kill_restarts_and_every_reader_ends_with_the_output(
    stack: Stack, user_key: str
) -> None:
    with httpx.Client(base_url=stack.url, timeout=60, headers=bearer(user_key)) as api:
        result_id = send(api, SLOW_MODEL, create_context(api, "cut me short"), STREAMED)
        seen: list[Event] = []
        with ThreadPoolExecutor(1) as pool:
            live = pool.submit(read_events, api, result_id, on_event=seen.append, timeout_s=60)
            _when(lambda: len(seen) >= 5, 30, "no text streamed")
            stack.kill_the_worker_running(result_id)
            events = live.result(timeout=90)
        final = wait_for_result(api, result_id)
        from_start = read_events(api, result_id)
        restart = next(e for e in events if e.event == "restart")
        resumed_before = read_events(api, result_id, last_event_id=2)
        resumed_after = read_events(api, result_id, last_event_id=restart.id)

    assert final["status"] == "completed" and final["completion_tokens"] == 150
    output = final["output"]
    # The live reader: the first run's text, one restart, then the job's text; ids one after another.
    assert [e.event for e in events].count("restart") == 1
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    cut = events.index(restart)
    assert cut >= 5 and text_of(events[cut:]) == output
    assert not output.startswith(
        text_of(events[:cut])
    )  # the runs differ: one text after the other would be wrong
    assert events[-1].event == "done" and events[-1].data["output"] == output
    assert "drop the text" in restart.data["reason"]
    # Later readers: from the start, no restart to act on; after event 2, the restart first.
    assert "restart" not in [e.event for e in from_start] and text_of(from_start) == output
    assert from_start[0].id == restart.id + 1 and from_start[-1].id == events[-1].id
    assert resumed_before[0].event == "restart" and text_of(resumed_before) == output
    assert "restart" not in [e.event for e in resumed_after] and text_of(resumed_after) == output


def _seed_for_a_long_text(prompt: str, params: dict[str, Any]) -> int:
    """A seed with which the simulated model writes `max_tokens` tokens (no early end)."""
    for seed in range(5000):
        if simulate(prompt, {**params, "seed": seed}, 512).completion_tokens == params["max_tokens"]:
            return seed
    raise AssertionError("no seed gives a text of max_tokens")


def test_an_openai_stream_cut_by_a_worker_kill_ends_with_an_error_not_two_texts(
    stack: Stack, user_key: str
) -> None:
    params = {"max_tokens": 100, "temperature": 1.0, "top_p": 1.0}
    prompt = "<|im_start|>user\nTell me a long story.<|im_end|>\n<|im_start|>assistant\n"
    seed = _seed_for_a_long_text(prompt, params)
    texts: list[str] = []
    first_text = threading.Event()
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=user_key, max_retries=0)

    def read() -> str:
        stream = sdk.chat.completions.create(
            model=SLOW_MODEL,
            messages=[{"role": "user", "content": "Tell me a long story."}],
            stream=True,
            seed=seed,
            **params,  # type: ignore[arg-type]
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                texts.append(chunk.choices[0].delta.content)
                first_text.set()
        return chunk.id

    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(read)
        assert first_text.wait(30), "no text streamed"
        with httpx.Client(base_url=stack.url, timeout=30, headers=bearer(user_key)) as api:
            [job] = api.get("/results/", params={"model": SLOW_MODEL, "status": "pending"}).json()["items"]
            stack.kill_the_worker_running(job["id"])
            with pytest.raises(openai.APIError) as raised:
                reader.result(timeout=90)
            final = wait_for_result(api, job["id"])
    assert "runs again from the start" in raised.value.message
    assert raised.value.code == "generation_restarted"
    assert 0 < len("".join(texts)) < len(final["output"])  # the stream stopped at the restart
    assert final["status"] == "completed" and final["completion_tokens"] == 100


def test_a_streamed_job_cancelled_after_its_worker_died_keeps_the_text_its_stream_delivered(
    stack: Stack, user_key: str
) -> None:
    """Its worker cannot say what it had produced: the row takes its stream's text, so that the row
    and the stream agree (before: an empty output under a stream of hundreds of characters)."""
    with httpx.Client(base_url=stack.url, timeout=60, headers=bearer(user_key)) as api:
        result_id = send(api, SLOW_MODEL, create_context(api, "cancel me when alone"), STREAMED)
        seen: list[Event] = []
        with ThreadPoolExecutor(1) as pool:
            live = pool.submit(read_events, api, result_id, on_event=seen.append, timeout_s=60)
            _when(lambda: len(seen) >= 5, 30, "no text streamed")
            stack.kill_the_worker_running(result_id, replace=False)
            try:
                cancelled = api.post(f"/results/{result_id}/cancel")  # before the lease lapses (3 s)
            finally:
                stack.add_worker()
            events = live.result(timeout=60)
        again = api.get(f"/results/{result_id}").json()
        from_start = read_events(api, result_id)
    assert cancelled.status_code == 200, cancelled.text
    row = cancelled.json()
    assert row["status"] == "cancelled" and row["finish_reason"] == "abort"
    assert len(row["output"]) >= len(text_of(seen[:5])) > 0
    assert row["output"] == text_of(events) == text_of(from_start) == again["output"]
    assert events[-1].event == "done" and events[-1].data["output"] == row["output"]
    assert row["completion_tokens"] is None  # its worker never said
