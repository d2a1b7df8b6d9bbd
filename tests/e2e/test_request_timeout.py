"""A generation that outlives TRITON_REQUEST_TIMEOUT_S fails at once, saying so, instead of being run
again from the start at every attempt (each run as long, the engine's work multiplied by
JOB_MAX_ATTEMPTS). A real worker with a 1 s request timeout and a 3 s job on the real local Triton."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg
from devstack.processes import worker_process

from tests.conftest import SLOW_MODEL
from tests.e2e.helpers import ring


def test_a_job_past_the_grpc_timeout_fails_once_naming_the_setting(
    e2e_env: dict[str, str], e2e_db_url: str, logs_dir: Path
) -> None:
    queue = f"timeout-{uuid.uuid4().hex[:8]}"
    env = {**e2e_env, "CELERY_QUEUE": queue, "TRITON_REQUEST_TIMEOUT_S": "1", "JOB_MAX_ATTEMPTS": "5"}
    url = e2e_db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        context_id = conn.execute(
            "INSERT INTO context (id, tenant, content) VALUES (gen_random_uuid(), 'default', 'a long one') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        result_id = str(
            conn.execute(
                "INSERT INTO result (id, tenant, context_id, model, params) VALUES (gen_random_uuid(), 'default', %s, %s, "
                """'{"max_tokens": 200, "ignore_eos": true}'::jsonb) RETURNING id""",
                (context_id, SLOW_MODEL),
            ).fetchone()[0]  # type: ignore[index]
        )
    worker = worker_process(env, logs_dir / "timeout-worker.log", sweeper=False).start()
    try:
        worker.wait_for_log("ready.", timeout_s=60)
        ring(queue, result_id)
        deadline = time.monotonic() + 30
        while True:
            with psycopg.connect(url) as conn:
                status, attempts, error = conn.execute(
                    "SELECT status, attempts, error FROM result WHERE id = %s", (result_id,)
                ).fetchone()  # type: ignore[misc]
            if status != "pending" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        worker.stop()
    assert status == "failed" and attempts == 1, (status, attempts, error)
    assert error.startswith("the generation did not end within TRITON_REQUEST_TIMEOUT_S"), error
