"""Property-based fuzzing of every endpoint from the OpenAPI schema: whatever a client sends,
the API answers with a status it means (never a 5xx) and the error shape, against the real
database and Triton."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from sqlalchemy import make_url

from app.config import get_settings
from app.errors import is_openai_path
from app.main import create_app
from tests.conftest import ADMIN_KEY, PG_BASE, bearer
from tests.db_utils import recreate_database


def test_no_input_makes_the_api_fail(triton: object) -> None:
    # Its own database: schemathesis drives the app from its own event loop, so the app keeps
    # its own database here.
    url = recreate_database(PG_BASE, os.environ.get("TEST_FUZZ_DB", "llmq_fuzz"))
    app_settings = get_settings().model_copy(
        update={"DATABASE_URL": url, "TRITON_URL": triton.http_url, "MAX_CONTENT_BYTES": 4096}  # type: ignore[attr-defined]
    )
    app = create_app(app_settings, enqueue=lambda _id: None)
    # schemathesis runs the app without its lifespan, on event loops of its own: one connection
    # per statement instead of the app's pool, whose background tasks would outlive those loops.
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    class OneConnectionPerUse:
        @asynccontextmanager
        async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as connection:
                yield connection

    app.state.runtime.db = OneConnectionPerUse()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checked = []
    for result, mode in ((r, m) for r in schema.get_all_operations() for m in GenerationMode):
        operation = result.ok()

        # Positive cases follow the schema; negative ones break it on purpose (wrong types, bounds).
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            response = case.call(headers=bearer(ADMIN_KEY))
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text)
            if response.status_code >= 400 and is_openai_path(case.formatted_path):  # OpenAI's shape
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
            elif response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error", "detail"} and isinstance(body["error"], str) and body["error"]

        try:
            check()
        except Unsatisfiable:
            if mode is GenerationMode.NEGATIVE:
                continue  # nothing to break: the operation takes no input
            raise
        checked.append(f"{mode.value} {operation.method.upper()} {operation.path}")
    assert len(checked) >= 15, checked
