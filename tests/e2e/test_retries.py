"""Triton outages wait, they do not fail: a real worker and a real API whose Triton (gRPC and HTTP)
is behind proxies the test switches off and on. Jobs accepted during the outage wait without
spending attempts, the worker stops taking messages and resumes by itself, the API keeps accepting
jobs for models it saw ready and says Triton is down; a job fails for the outage only at its deadline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from devstack.processes import ManagedProcess, api_process, free_port, worker_process
from localtriton.engine import simulate

from tests.conftest import ADMIN_KEY, E2E_DB, FAST_MODEL, PG_BASE, bearer
from tests.db_utils import recreate_database
from tests.e2e.tcp_proxy import TcpProxy

DEADLINE_S = 20
OUTAGE_S = 12  # longer than every attempt with its backoff (JOB_MAX_ATTEMPTS=2 here)


class Proxies:
    """Triton's gRPC and HTTP ports as the worker and the API see them."""

    def __init__(self, triton: Any) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        grpc_host, grpc_port = triton.grpc_url.rsplit(":", 1)
        http_host, http_port = triton.http_url.removeprefix("http://").rsplit(":", 1)
        self._proxies = [
            TcpProxy(self.grpc_port, (grpc_host, int(grpc_port))),
            TcpProxy(self.http_port, (http_host, int(http_port))),
        ]
        self.up = False

    def start(self) -> None:
        for proxy in self._proxies:
            proxy.start()
        self.up = True

    def stop(self) -> None:
        for proxy in self._proxies:
            proxy.stop()
        self.up = False


@pytest.fixture(scope="module")
def proxies(triton: object) -> Iterator[Proxies]:
    p = Proxies(triton)
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def stack(e2e_env: dict[str, str], logs_dir: Path, proxies: Proxies) -> Iterator[dict[str, Any]]:
    # A database of its own: its sweeper enforces a short deadline.
    db_url = recreate_database(PG_BASE, f"{E2E_DB}_outage")
    queue = e2e_env["CELERY_QUEUE"] + "-outage"
    env = {
        **e2e_env,
        "DATABASE_URL": db_url,
        "CELERY_QUEUE": queue,
        "TRITON_GRPC_URL": f"127.0.0.1:{proxies.grpc_port}",
        "TRITON_URL": f"http://127.0.0.1:{proxies.http_port}",
        "TRITON_CONNECT_TIMEOUT_S": "0.5",
        "JOB_MAX_ATTEMPTS": "2",
        "JOB_DEADLINE_S": str(DEADLINE_S),
        "SWEEP_REQUEUE_AFTER_S": "60",
    }
    worker = worker_process(env, logs_dir / "outage-worker.log").start()
    port = free_port()
    api = api_process(env, logs_dir / "outage-api.log", port=port).start()
    try:
        worker.wait_for_log("ready.", timeout_s=60)
        api.wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s=30)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=bearer(ADMIN_KEY)) as http:
            key = http.post("/admin/keys", json={"tenant": "outage", "name": "outage"}).json()["key"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=bearer(key)) as user:
            yield {"api": user, "worker": worker, "db": db_url, "queue": queue}
    finally:
        api.stop()
        worker.stop()


def _rows(db_url: str, ids: list[str]) -> list[dict[str, Any]]:
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        cur = conn.execute("SELECT id::text, * FROM result WHERE id = ANY(%s::uuid[])", (ids,))
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _send(api: httpx.Client, context_id: str, seed: int) -> str:
    response = api.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 6, "seed": seed})
    assert response.status_code == 202, response.text
    return str(response.json()["result_id"])


def _wait_terminal(db_url: str, ids: list[str], timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _rows(db_url, ids)
        if all(r["status"] != "pending" for r in rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def test_an_outage_costs_no_attempt_and_the_worker_resumes_by_itself(
    stack: dict[str, Any], proxies: Proxies
) -> None:
    api: httpx.Client = stack["api"]
    worker: ManagedProcess = stack["worker"]
    prompt = "Wait for Triton."
    context_id = api.post("/contexts/", json={"content": prompt}).json()["id"]
    first = _send(api, context_id, 0)  # the API sees the model ready
    assert api.get(f"/results/{first}?wait=20").json()["status"] == "completed"

    proxies.stop()
    outage_started = time.monotonic()
    ready = api.get("/health/ready")
    assert ready.status_code == 503
    triton = ready.json()["components"]["triton"]
    assert (
        not triton["ok"] and "Triton is down" in triton["detail"] and "accepted and wait" in triton["detail"]
    )
    unknown = api.post(f"/models/send/never-seen/{context_id}", json={})
    assert unknown.status_code == 503, unknown.text  # only models seen ready are accepted blind
    ids = [_send(api, context_id, seed) for seed in range(1, 6)]  # accepted while Triton is down

    worker.wait_for_log("Canceling queue", timeout_s=15)  # the worker stopped taking messages
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
    rows = _rows(stack["db"], ids)
    assert all(r["status"] == "pending" and r["attempts"] == 0 and r["started_at"] is None for r in rows), (
        rows
    )
    assert any((r["error"] or "").startswith("waiting for Triton: ") for r in rows), rows
    assert redis.Redis.from_url(api_redis_url()).llen(stack["queue"]) >= 1  # the messages wait in Redis

    proxies.start()
    rows = _wait_terminal(stack["db"], ids, 30)
    worker.wait_for_log("Triton is ready again", timeout_s=5)
    for row in rows:
        assert row["status"] == "completed" and row["attempts"] == 1 and row["error"] is None, row
        assert row["output"] == simulate(prompt, {"max_tokens": 6, "seed": row["params"]["seed"]}, 512).text


def test_a_job_fails_for_an_outage_only_at_its_deadline_saying_so(
    stack: dict[str, Any], proxies: Proxies
) -> None:
    api: httpx.Client = stack["api"]
    context_id = api.post("/contexts/", json={"content": "Too long a wait."}).json()["id"]
    first = _send(api, context_id, 0)
    assert api.get(f"/results/{first}?wait=20").json()["status"] == "completed"
    proxies.stop()
    try:
        started = time.monotonic()
        ids = [_send(api, context_id, seed) for seed in (1, 2)]
        time.sleep(DEADLINE_S / 2)
        assert all(r["status"] == "pending" for r in _rows(stack["db"], ids)), [
            (r["status"], r["attempts"], r["error"], r["output"]) for r in _rows(stack["db"], ids)
        ]
        rows = _wait_terminal(stack["db"], ids, DEADLINE_S + 15)
        assert time.monotonic() - started >= DEADLINE_S * 0.9
        for row in rows:
            assert row["status"] == "failed", row
            assert row["error"].startswith(
                f"deadline exceeded: still pending {DEADLINE_S} s after submission"
            ), row
            assert "Triton unreachable" in row["error"], row
    finally:
        proxies.start()


def api_redis_url() -> str:
    import os

    return os.environ["REDIS_URL"]
