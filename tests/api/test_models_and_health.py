"""Model listing and health, against the real local Triton and a Triton that is not there."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from devstack.processes import free_port

from app.main import StartRefused
from app.routes.health import SCHEMA_REVISION
from app.triton.admin import TritonAdmin, TritonUnavailable
from tests.conftest import (
    ADMIN_KEY,
    FAST_MODEL,
    PG_BASE,
    SLOW_MODEL,
    UNLOADED_MODEL,
    bearer,
    make_api_app,
    serve_in_process,
)

pytestmark = pytest.mark.anyio


async def test_models_are_read_live_from_triton(client: httpx.AsyncClient) -> None:
    response = await client.get("/models/")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()}
    assert set(models) == {FAST_MODEL, SLOW_MODEL, UNLOADED_MODEL}
    assert models[FAST_MODEL]["ready"] is True
    assert models[FAST_MODEL]["state"] == "READY"
    assert models[FAST_MODEL]["version"] == "1"
    assert models[UNLOADED_MODEL]["ready"] is False


async def test_health_and_readiness_with_everything_up(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert {name: c["ok"] for name, c in ready.json()["components"].items()} == {
        "postgres": True,
        "redis": True,
        "triton": True,
    }


@pytest.fixture
async def client_without_triton(db: object) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_in_process(make_api_app(f"http://127.0.0.1:{free_port()}", None)) as client:
        client.headers.update(bearer(ADMIN_KEY))
        yield client


async def test_readiness_reports_triton_down(
    client_without_triton: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_without_triton
    with caplog.at_level(logging.WARNING, logger="app.routes.health"):
        ready = await client.get("/health/ready")
        await client.get("/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "unavailable"
    assert body["components"]["postgres"]["ok"] is True
    assert body["components"]["redis"]["ok"] is True
    assert body["components"]["triton"]["ok"] is False
    assert "unreachable" in body["components"]["triton"]["detail"]
    # Readiness is public: the address goes to the log (once for two probes), never to the answer.
    assert "127.0.0.1" not in ready.text and "http" not in ready.text
    causes = [r.getMessage() for r in caplog.records if "readiness: triton" in r.getMessage()]
    assert len(causes) == 1 and "127.0.0.1" in causes[0], causes


async def test_listing_models_with_triton_down_is_503(client_without_triton: httpx.AsyncClient) -> None:
    client = client_without_triton
    response = await client.get("/models/")
    assert response.status_code == 503
    assert "Triton is unreachable" in response.json()["error"]
    for path in ("/models/", "/v1/models", f"/v1/models/{FAST_MODEL}"):  # no address for a caller
        answer = await client.get(path)
        assert answer.status_code == 503 and "127.0.0.1" not in answer.text and "http" not in answer.text


async def test_send_with_triton_down_is_503_and_stores_nothing(
    client_without_triton: httpx.AsyncClient,
) -> None:
    client = client_without_triton
    context_id = (await client.post("/contexts/", json={"content": "hi"})).json()["id"]
    response = await client.post(f"/models/send/{FAST_MODEL}/{context_id}")
    assert response.status_code == 503
    assert (
        f"cannot check model '{FAST_MODEL}'" in response.json()["error"] and "127.0.0.1" not in response.text
    )
    assert (await client.get("/results/")).json()["items"] == []


async def test_openapi_describes_the_endpoints(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    send = spec["paths"]["/models/send/{model_name}/{context_id}"]["post"]
    assert "poll" in send["description"]
    assert "202" in send["responses"]
    assert spec["paths"]["/results/{result_id}"]["get"]["description"]


async def test_startup_objects_are_kept_out_of_the_garbage_collector(api_db_url: str) -> None:
    # A full collection walking every module object stalled the event loop (83-141 ms measured).
    import gc

    from app.config import get_settings
    from app.main import create_app

    gc.unfreeze()
    app = create_app(get_settings().model_copy(update={"DATABASE_URL": api_db_url}), enqueue=lambda _id: None)
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 10_000


async def test_a_triton_that_never_answers_is_503_saying_it_timed_out() -> None:
    # A stopped (SIGSTOP) or wedged Triton: the connection opens, no answer comes.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    admin = TritonAdmin(f"http://127.0.0.1:{port}", timeout_s=0.3)
    try:
        with pytest.raises(TritonUnavailable) as raised:
            await admin.list_models()
    finally:
        await admin.close()
        server.close()
    assert str(raised.value) == f"Triton at http://127.0.0.1:{port} is unreachable: ReadTimeout"


@pytest.fixture
def scratch_database() -> Any:
    name = f"llmq_test_schema_{free_port()}"
    admin_url = PG_BASE.replace("+psycopg", "") + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    yield f"{PG_BASE}/{name}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _readiness_of_postgres(triton: Any, database_url: str) -> tuple[int, dict[str, Any]]:
    """Readiness as a running API answers it (the schema can change under it: no start check)."""
    app = make_api_app(triton.http_url, None, DATABASE_URL=database_url)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as http:
            ready = await http.get("/health/ready")
    finally:
        await app.state.runtime.db.close()
    return ready.status_code, ready.json()["components"]["postgres"]


async def test_readiness_says_a_database_without_the_schema_is_not_ready(
    triton: Any, scratch_database: str
) -> None:
    """Reachable is not enough: requests would fail on missing tables."""
    status, postgres = await _readiness_of_postgres(triton, scratch_database)
    assert status == 503
    assert postgres == {
        "ok": False,
        "detail": f"the database has no schema, this code needs {SCHEMA_REVISION}: run alembic upgrade head",
    }
    with pytest.raises(StartRefused, match="no schema"):  # and an API does not start on it
        async with serve_in_process(make_api_app(triton.http_url, None, DATABASE_URL=scratch_database)):
            pass


async def test_readiness_says_what_to_do_when_the_database_is_older_or_newer(
    triton: Any, scratch_database: str
) -> None:
    """Older: upgrade it. Newer (the previous release during a rolling deploy): ready, since
    migrations are additive, with a note naming the code to deploy, never "alembic upgrade head"."""
    with psycopg.connect(scratch_database.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('0004')")
        status, postgres = await _readiness_of_postgres(triton, scratch_database)
        assert status == 503
        assert postgres == {
            "ok": False,
            "detail": f"the database is at migration 0004, older than this code ({SCHEMA_REVISION}): "
            "run alembic upgrade head",
        }
        newer = f"{int(SCHEMA_REVISION) + 1:04d}"
        conn.execute("UPDATE alembic_version SET version_num = %s", (newer,))
        _, postgres = await _readiness_of_postgres(triton, scratch_database)
    assert postgres == {
        "ok": True,
        "detail": f"the database is at migration {newer}, newer than this code ({SCHEMA_REVISION}); it runs "
        f"on it (migrations are additive): deploy the code of migration {newer}",
    }
