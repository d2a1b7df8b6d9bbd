"""Shared fixtures: a test database built by `alembic upgrade head`, a real Triton, a real worker.

Environment is set before any `app` module reads its settings, so every test (and every
subprocess they start) talks to the test databases and a test-only Celery queue.
"""

from __future__ import annotations

import os
import uuid

_RUN = uuid.uuid4().hex[:8]
# The bootstrap admin key of every app and server the tests start (never a development value).
ADMIN_KEY = f"llmq_test-admin-{uuid.uuid4().hex}"
PG_BASE = os.environ.get("TEST_PG_BASE", "postgresql+psycopg://postgres:postgres@127.0.0.1:5432")
API_DB = os.environ.get("TEST_API_DB", "llmq_test")
E2E_DB = os.environ.get("TEST_E2E_DB", "llmq_e2e")

os.environ.update(
    {
        "APP_ENV": "test",
        "APP_ENV_FILE": "/dev/null",  # tests never read a developer's .env.api.dev
        "DATABASE_URL": f"{PG_BASE}/{API_DB}",
        "REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "CELERY_QUEUE": f"llmq-test-{_RUN}",
        "MODEL_CACHE_TTL_S": "0",
        # Several apps, API servers and workers share one Postgres (max_connections 100) in a run,
        # and the API keeps its statement pool full.
        "DB_POOL_SIZE": "5",
        "ADMIN_API_KEY": ADMIN_KEY,
        "QUOTA_PENDING_REFRESH_S": "0",  # exact pending counts in the API tests
    }
)

import shutil  # noqa: E402
from collections.abc import AsyncIterator, Iterator, Sequence  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import psycopg  # noqa: E402
import pytest  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from tests.db_utils import recreate_database  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIM_MODELS = Path(__file__).resolve().parent.parent / "nvidia_triton" / "localtriton" / "models"
FAST_MODEL = "sim-llm"
SLOW_MODEL = "sim-llm-slow"
UNLOADED_MODEL = "sim-llm-unloaded"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


# ---------------------------------------------------------------- Triton (real tritonserver)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in simulated models, plus one left unloaded (for the 'not ready' case)."""
    repo = tmp_path_factory.mktemp("model_repository")
    for name in (FAST_MODEL, SLOW_MODEL):
        shutil.copytree(SIM_MODELS / name, repo / name)
    shutil.copytree(SIM_MODELS / FAST_MODEL, repo / UNLOADED_MODEL)
    return repo


@pytest.fixture(scope="session")
def triton(model_repository: Path, logs_dir: Path) -> Iterator[object]:
    from localtriton.launcher import LocalTriton

    server = LocalTriton(
        model_repository=model_repository,
        models=[FAST_MODEL, SLOW_MODEL],
        log_file=logs_dir / "tritonserver.log",
    )
    with server:
        yield server


# ---------------------------------------------------------------- API tests: the app in process


@pytest.fixture(scope="session")
def api_db_url() -> str:
    return recreate_database(PG_BASE, API_DB)


@pytest.fixture
async def db(api_db_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection to the API tests' database, emptied before each test (tests see only their rows)."""
    conn = await psycopg.AsyncConnection.connect(
        api_db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )
    await conn.execute("TRUNCATE result, context, api_key, tenant_limits, idempotency_key")
    try:
        yield conn
    finally:
        await conn.close()


class EnqueueRecorder:
    def __init__(self) -> None:
        self.calls: list[uuid.UUID] = []

    def __call__(self, result_id: uuid.UUID) -> None:
        self.calls.append(result_id)


@pytest.fixture
def enqueued() -> EnqueueRecorder:
    return EnqueueRecorder()


def make_api_app(
    triton_url: str,
    enqueue: EnqueueRecorder | None,
    dependencies: Sequence[Any] = (),
    fast_path: bool = True,
    **overrides: Any,
) -> FastAPI:
    from app.config import get_settings
    from app.main import create_app

    settings = get_settings().model_copy(
        update={"TRITON_URL": triton_url, "MAX_CONTENT_BYTES": 4096, **overrides}
    )
    return create_app(settings, enqueue=enqueue, dependencies=dependencies, fast_path=fast_path)


@asynccontextmanager
async def serve_in_process(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan (pool opened and closed), reached over ASGI."""
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api.test") as http,
    ):
        yield http


@asynccontextmanager
async def failing_on_demand(triton_url: str, enqueue: EnqueueRecorder) -> AsyncIterator[httpx.AsyncClient]:
    """An app (with its lifespan) whose every operation fails with a bug when the request carries
    `x-fail`, and an admin client of it that receives the 500 rather than the exception."""
    from fastapi import Depends, Header

    async def fails(x_fail: str | None = Header(None)) -> None:
        if x_fail:
            raise RuntimeError("a bug")

    app = make_api_app(triton_url, enqueue, dependencies=[Depends(fails)])
    async with app.router.lifespan_context(app):
        # Starlette's outermost middleware answers 500, then re-raises: not the tests' concern.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api.test", headers=bearer(ADMIN_KEY)
        ) as admin:
            yield admin


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def make_key(
    admin: httpx.AsyncClient | httpx.Client, tenant: str, scope: str = "user", **limits: int
) -> str:
    """A new key of `tenant`, made through the admin API (sync or async client)."""
    payload = {"tenant": tenant, "name": f"test key of {tenant}", "scope": scope, **limits}
    response = admin.post("/admin/keys", json=payload, headers=bearer(ADMIN_KEY))
    if not isinstance(response, httpx.Response):
        response = await response
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


@dataclass
class InProcessApi:
    """The app of one test, in process: one tenant's client (`user`) and the admin's."""

    app: FastAPI
    http: httpx.AsyncClient
    user: httpx.AsyncClient
    admin: httpx.AsyncClient
    tenant: str

    async def client_of(self, tenant: str, **limits: int) -> httpx.AsyncClient:
        key = await make_key(self.http, tenant, **limits)
        return httpx.AsyncClient(
            transport=self.http._transport, base_url="http://api.test", headers=bearer(key)
        )


@pytest.fixture
async def api_app(
    db: psycopg.AsyncConnection[Any], triton: object, enqueued: EnqueueRecorder
) -> AsyncIterator[InProcessApi]:
    app = make_api_app(triton.http_url, enqueued)  # type: ignore[attr-defined]
    async with serve_in_process(app) as http:
        tenant = f"tenant-{uuid.uuid4().hex[:8]}"
        key = await make_key(http, tenant)
        transport = http._transport
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://api.test", headers=bearer(key)) as user,
            httpx.AsyncClient(
                transport=transport, base_url="http://api.test", headers=bearer(ADMIN_KEY)
            ) as admin,
        ):
            yield InProcessApi(app, http, user, admin, tenant)


@pytest.fixture
async def client(api_app: InProcessApi) -> httpx.AsyncClient:
    """A user key's client (one tenant of its own per test)."""
    return api_app.user


@pytest.fixture
async def admin_client(api_app: InProcessApi) -> httpx.AsyncClient:
    return api_app.admin


# ---------------------------------------------------------------- end to end: real processes


@pytest.fixture(scope="session")
def e2e_db_url() -> str:
    return recreate_database(PG_BASE, E2E_DB)


@pytest.fixture(scope="session")
def e2e_env(e2e_db_url: str, triton: object) -> dict[str, str]:
    return {
        "APP_ENV": "test",
        "APP_ENV_FILE": "/dev/null",
        "DATABASE_URL": e2e_db_url,
        "REDIS_URL": os.environ["REDIS_URL"],
        "CELERY_QUEUE": os.environ["CELERY_QUEUE"],
        "DB_POOL_SIZE": os.environ["DB_POOL_SIZE"],
        "TRITON_URL": triton.http_url,  # type: ignore[attr-defined]
        "TRITON_GRPC_URL": triton.grpc_url,  # type: ignore[attr-defined]
        "MODEL_CACHE_TTL_S": "1",
        "MAX_CONTENT_BYTES": "4096",
        "CHAT_TEMPLATES_DIRS": str(SIM_MODELS),
        "WORKER_IN_FLIGHT": "64",
        "SWEEP_INTERVAL_S": "1",
        "SWEEP_REQUEUE_AFTER_S": "3",
        "RETRY_BACKOFF_BASE_S": "0.2",
        "RETRY_BACKOFF_MAX_S": "1",
        "ADMIN_API_KEY": ADMIN_KEY,
        "KEY_CACHE_TTL_S": "1",
    }


@pytest.fixture(scope="session")
def worker(e2e_env: dict[str, str], logs_dir: Path) -> Iterator[object]:
    from devstack.processes import worker_process

    proc = worker_process(e2e_env, logs_dir / "worker.log").start()
    try:
        proc.wait_for_log("ready.", timeout_s=60)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def api_server(e2e_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    from devstack.processes import api_process, free_port

    port = free_port()
    proc = api_process(e2e_env, logs_dir / "api.log", port=port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_for_http(f"{url}/health", timeout_s=30)
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def e2e_user_key(api_server: str) -> str:
    with httpx.Client(base_url=api_server, timeout=30) as http:
        response = http.post(
            "/admin/keys", json={"tenant": "e2e", "name": "e2e tests"}, headers=bearer(ADMIN_KEY)
        )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


@pytest.fixture
def api(api_server: str, worker: object, e2e_user_key: str) -> Iterator[httpx.Client]:
    """The real API server, with a user key of the tenant `e2e`."""
    with httpx.Client(base_url=api_server, timeout=30, headers=bearer(e2e_user_key)) as http:
        yield http
