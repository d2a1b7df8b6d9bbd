"""Property-based fuzzing of every endpoint from the OpenAPI schema: whatever a client sends,
the API answers with a status it means (never a 5xx) and the error shape, against the real
database and Triton."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from sqlalchemy import Connection

from tests.conftest import make_api_app


def test_no_input_makes_the_api_fail(db_connection: Connection, triton: object) -> None:
    app = make_api_app(db_connection, triton.http_url, lambda _id: None)  # type: ignore[attr-defined]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checked = []
    for result, mode in ((r, m) for r in schema.get_all_operations() for m in GenerationMode):
        operation = result.ok()

        # Positive cases follow the schema; negative ones break it on purpose (wrong types, bounds).
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            response = case.call()
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text)
            if response.status_code >= 400:
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
