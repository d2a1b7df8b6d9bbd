"""Postgres down: every endpoint of a real API server answers within a second (503 where it needs
the database), the worker keeps the results it generated meanwhile and writes them when Postgres
is back (not generated again), and both recover without a restart. Postgres here is a cluster of
the test's own, stopped (-m immediate: every connection cut) and started again."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from devstack.own_postgres import OwnPostgres
from devstack.processes import ManagedProcess, api_process, free_port, worker_process

from tests.conftest import ADMIN_KEY, SLOW_MODEL, bearer
from tests.db_utils import recreate_database

# What answers without the database (Triton's model list, the API's description, liveness).
NO_DATABASE = {
    "/health",
    "/models/",
    "/openapi.json",
    "/docs",
    "/redoc",
    "/docs/oauth2-redirect",
    "/v1/models",
}
MUST_BE_503 = {
    ("POST", "/contexts/"),
    ("GET", "/contexts/"),
    ("GET", "/contexts/{context_id}"),
    ("POST", "/models/send/{model_name}/{context_id}"),
    ("GET", "/results/{result_id}"),
    ("GET", "/results/"),
    ("POST", "/results/{result_id}/cancel"),
    ("POST", "/admin/keys"),
    ("GET", "/admin/keys"),
    ("GET", "/health/ready"),
}


@pytest.fixture(scope="module")
def stack(e2e_env: dict[str, str], logs_dir: Path) -> Iterator[dict[str, Any]]:
    with OwnPostgres() as pg:
        url = recreate_database(pg.base_url, "llmq")
        env = {
            **e2e_env,
            "DATABASE_URL": url,
            "CELERY_QUEUE": e2e_env["CELERY_QUEUE"] + "-pgdown",
            "KEY_CACHE_TTL_S": "1",
        }
        worker = worker_process(env, logs_dir / "pgdown-worker.log").start()
        port = free_port()
        api = api_process(env, logs_dir / "pgdown-api.log", port=port).start()
        try:
            worker.wait_for_log("ready.", timeout_s=60)
            api.wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s=30)
            yield {"pg": pg, "url": f"http://127.0.0.1:{port}", "db": url, "worker": worker, "api": api}
        finally:
            api.stop()
            worker.stop()


def _sample_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path.replace("{model_name}", SLOW_MODEL))


_BODIES: dict[str, Any] = {
    "/contexts/": {"content": "hello"},
    "/admin/keys": {"tenant": "t", "name": "n"},
}


def _rows(db_url: str, ids: list[str]) -> list[dict[str, Any]]:
    conninfo = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        cur = conn.execute(
            "SELECT id::text, status, attempts, started_at, error FROM result WHERE id = ANY(%s::uuid[])",
            (ids,),
        )
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_postgres_down_every_endpoint_answers_within_a_second_and_nothing_is_generated_twice(
    stack: dict[str, Any],
) -> None:
    pg: OwnPostgres = stack["pg"]
    worker: ManagedProcess = stack["worker"]
    admin = httpx.Client(base_url=stack["url"], timeout=10, headers=bearer(ADMIN_KEY))
    key = admin.post("/admin/keys", json={"tenant": "pgdown", "name": "pgdown"}).json()["key"]
    user = httpx.Client(base_url=stack["url"], timeout=10, headers=bearer(key))
    context_id = user.post("/contexts/", json={"content": "Keep this while Postgres is away."}).json()["id"]
    ids = [
        user.post(
            f"/models/send/{SLOW_MODEL}/{context_id}", json={"max_tokens": 200, "ignore_eos": True, "seed": i}
        ).json()["result_id"]
        for i in range(6)
    ]
    deadline = time.monotonic() + 20
    while not all(r["started_at"] is not None for r in _rows(stack["db"], ids)):  # all running
        assert time.monotonic() < deadline
        time.sleep(0.05)

    # A stream open when Postgres goes (a job sent without `stream`: nothing comes until its end).
    stream_lines: list[str] = []

    def read_stream() -> None:
        with (
            httpx.Client(base_url=stack["url"], timeout=30, headers=bearer(key)) as reader,
            reader.stream("GET", f"/results/{ids[0]}/stream") as response,
        ):
            stream_lines.extend(response.iter_lines())

    stream_reader = threading.Thread(target=read_stream)
    stream_reader.start()
    time.sleep(0.3)

    pg.stop_immediate()
    stopped_at = time.monotonic()
    operations = [
        (method.upper(), path)
        for path, item in admin.get("/openapi.json").json()["paths"].items()
        for method in item
        if path not in {"/docs", "/redoc"}
    ]
    unknown_key = httpx.Client(base_url=stack["url"], timeout=10, headers=bearer("llmq_" + "x" * 40))
    answers = []
    for client in (admin, user, unknown_key):
        for method, path in operations:
            started = time.monotonic()
            body = _BODIES.get(path, {} if method in ("POST", "PUT") else None)
            response = client.request(method, _sample_path(path), json=body)
            answers.append(
                (method, path, response.status_code, time.monotonic() - started, response.text[:200])
            )
    print(
        f"Postgres down: {len(answers)} requests, the slowest answered in {max(a[3] for a in answers):.3f}s"
    )
    slow = [a for a in answers if a[3] >= 1.0]
    assert not slow, slow
    wrong = [a for a in answers if a[2] >= 500 and a[2] != 503]
    assert not wrong, wrong
    answered = {(m, p): (s, text) for m, p, s, _, text in answers[: len(operations)]}  # the admin key's
    assert set(answered) >= MUST_BE_503
    assert not [(op, answered[op]) for op in MUST_BE_503 if answered[op][0] != 503]
    # Elsewhere a 503, or a 4xx decided before any database use (validation, a user key on an admin path).
    assert not [a for a in answers if a[1] not in NO_DATABASE and a[2] != 503 and not 400 <= a[2] < 500]
    assert "the database is unavailable" in user.get(f"/results/{ids[0]}").json()["error"]

    # The generations end while Postgres is down: their results are kept, waiting to be written.
    worker.wait_for_log("wait for Postgres", timeout_s=30)
    # Down for 7 s at least: the stream looks at the row after 5 s without news.
    time.sleep(max(0.0, 7 - (time.monotonic() - stopped_at)))
    pg.start()
    stream_reader.join(timeout=30)
    # It ended with an event saying why and where to resume, not with a cut connection.
    assert "event: error" in stream_lines, stream_lines
    error = json.loads(stream_lines[stream_lines.index("event: error") + 1].removeprefix("data: "))
    assert "the database is unavailable" in error["error"]
    assert error["detail"] == {"status": 503, "last_event_id": 0}
    deadline = time.monotonic() + 30
    while True:  # neither the API nor the worker is restarted
        response = user.get(f"/results/{ids[0]}")
        if response.status_code == 200:
            break
        assert response.status_code == 503 and time.monotonic() < deadline, response.text
        time.sleep(0.2)
    recovered_s = time.monotonic() - deadline + 30
    deadline = time.monotonic() + 30
    while any(r["status"] == "pending" for r in _rows(stack["db"], ids)):
        assert time.monotonic() < deadline, _rows(stack["db"], ids)
        time.sleep(0.2)
    rows = _rows(stack["db"], ids)
    assert all(r["status"] == "completed" for r in rows), rows
    assert all(r["attempts"] == 1 for r in rows), rows  # written when Postgres came back, not generated again
    print(f"API answering again {recovered_s:.1f}s after Postgres restarted")
    fresh = user.post(f"/models/send/{SLOW_MODEL}/{context_id}", json={"max_tokens": 4})
    assert fresh.status_code == 202, fresh.text
    assert user.get(f"/results/{fresh.json()['result_id']}?wait=30").json()["status"] == "completed"
