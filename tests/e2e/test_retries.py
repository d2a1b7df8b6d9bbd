"""Transient Triton failures: a real worker whose Triton is behind a proxy the test switches on/off."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from devstack.processes import ManagedProcess, free_port, worker_process
from localtriton.engine import simulate
from sqlalchemy import Engine, create_engine, text

from tests.conftest import FAST_MODEL
from tests.e2e.helpers import create_context, ring, wait_for_result
from tests.e2e.tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def proxy_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def retry_queue(e2e_env: dict[str, str]) -> str:
    return e2e_env["CELERY_QUEUE"] + "-retry"


@pytest.fixture(scope="module")
def retry_worker(e2e_env: dict[str, str], logs_dir: Path, proxy_port: int, retry_queue: str) -> Iterator[ManagedProcess]:
    env = {
        **e2e_env,
        "CELERY_QUEUE": retry_queue,
        "TRITON_GRPC_URL": f"127.0.0.1:{proxy_port}",
        "TRITON_CONNECT_TIMEOUT_S": "0.5",
        "JOB_MAX_ATTEMPTS": "3",
        "RETRY_BACKOFF_BASE_S": "0.5",
        "RETRY_BACKOFF_MAX_S": "1",
    }
    proc = worker_process(env, logs_dir / "retry-worker.log", beat=False).start()
    try:
        proc.wait_for_log("ready.", timeout_s=60)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def engine(e2e_env: dict[str, str]) -> Iterator[Engine]:
    eng = create_engine(e2e_env["DATABASE_URL"])
    yield eng
    eng.dispose()


def _submit_directly(engine: Engine, context_id: str, params: str, queue: str) -> str:
    """Commit a pending row and ring the retry worker's doorbell (its own queue)."""

    with engine.begin() as conn:
        result_id = str(
            conn.execute(
                text(
                    "INSERT INTO result (id, tenant, context_id, model, params) VALUES "
                    "(gen_random_uuid(), (SELECT tenant FROM context WHERE id = :c), :c, :m, CAST(:p AS jsonb)) "
                    "RETURNING id"
                ),
                {"c": context_id, "m": FAST_MODEL, "p": params},
            ).scalar_one()
        )
    ring(queue, result_id)
    return result_id


def _row(engine: Engine, result_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM result WHERE id = :id"), {"id": result_id}).mappings().one())


def test_unreachable_triton_retries_then_fails_with_the_reason(
    api: httpx.Client, engine: Engine, retry_worker: ManagedProcess, retry_queue: str, proxy_port: int
) -> None:
    context_id = create_context(api, "Is anybody there?")
    result_id = _submit_directly(engine, context_id, '{"max_tokens": 4}', retry_queue)
    result = wait_for_result(api, result_id, timeout_s=40)
    assert result["status"] == "failed"
    assert result["attempts"] == 3
    assert result["error"].startswith("gave up after 3 attempts: Triton at 127.0.0.1:")
    assert "unreachable" in result["error"]


def test_job_recovers_when_triton_comes_back(
    api: httpx.Client, engine: Engine, retry_worker: ManagedProcess, retry_queue: str, proxy_port: int, triton: object
) -> None:
    prompt = "Wait for me."
    context_id = create_context(api, prompt)
    result_id = _submit_directly(engine, context_id, '{"max_tokens": 6, "seed": 9}', retry_queue)

    # First attempt fails while Triton is unreachable; the row says so while it waits to retry.
    deadline = time.monotonic() + 20
    while not (_row(engine, result_id)["error"] or "").startswith("attempt 1 failed, retrying in"):
        assert time.monotonic() < deadline, _row(engine, result_id)
        time.sleep(0.05)
    row = _row(engine, result_id)
    assert row["status"] == "pending" and row["started_at"] is None  # claim released for the retry

    host, port = triton.grpc_url.rsplit(":", 1)  # type: ignore[attr-defined]
    proxy = TcpProxy(proxy_port, (host, int(port)))
    proxy.start()
    try:
        result = wait_for_result(api, result_id, timeout_s=40)
    finally:
        proxy.stop()
    assert result["status"] == "completed", result
    assert result["error"] is None
    assert result["attempts"] >= 2
    assert result["output"] == simulate(prompt, {"max_tokens": 6, "seed": 9}, 512).text
