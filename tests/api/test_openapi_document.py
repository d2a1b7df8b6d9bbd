"""The API description says what the app answers: each error a request really gets is documented
for its operation, and its body matches the schema the document gives for that status."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import jsonschema_rs
import pytest

from app.auth import PUBLIC_PATHS
from app.errors import is_openai_path
from tests.conftest import (
    ADMIN_KEY,
    FAST_MODEL,
    EnqueueRecorder,
    InProcessApi,
    bearer,
    make_api_app,
    serve_in_process,
)

pytestmark = pytest.mark.anyio

SEND = "/models/send/{model_name}/{context_id}"
UNKNOWN_KEY = bearer("llmq_" + "x" * 43)


async def _spec(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]


def assert_documented(spec: dict[str, Any], method: str, path: str, response: httpx.Response) -> None:
    """`response` (of `method` on the operation `path`) has a documented status, headers and body."""
    status = str(response.status_code)
    documented = spec["paths"][path][method.lower()]["responses"]
    assert status in documented, (method, path, status, sorted(documented), response.text)
    for header in documented[status].get("headers", {}):
        assert header.lower() in response.headers, (method, path, status, header)
    schema = documented[status]["content"]["application/json"]["schema"]
    validator = jsonschema_rs.Draft202012Validator({**schema, "components": spec["components"]})
    problems = [str(error) for error in validator.iter_errors(response.json())]
    assert not problems, (method, path, status, response.text, problems)


async def test_each_error_a_request_gets_is_documented_with_the_body_it_has(api_app: InProcessApi) -> None:
    user, admin, anonymous = api_app.user, api_app.admin, api_app.http
    spec = await _spec(anonymous)
    context_id = (await user.post("/contexts/", json={"content": "hi"})).json()["id"]
    send = SEND.replace("{model_name}", FAST_MODEL).replace("{context_id}", context_id)
    as_json = {"content-type": "application/json"}
    deep = b"[" * 5_000 + b"]" * 5_000
    huge = json.dumps({"content": "x" * 200_000}).encode()
    cases: list[tuple[httpx.AsyncClient, str, str, str, dict[str, Any], int]] = [
        (anonymous, "GET", "/contexts/", "/contexts/", {}, 401),
        (user, "GET", "/contexts/", "/contexts/?limit=0", {}, 422),
        (user, "GET", "/contexts/", "/contexts/?tenant=someone-else", {}, 403),
        (user, "POST", "/contexts/", "/contexts/", {"json": {"content": 7}}, 422),
        (user, "POST", "/contexts/", "/contexts/", {"content": b"\xff\xfe", "headers": as_json}, 422),
        (user, "POST", "/contexts/", "/contexts/", {"content": huge, "headers": as_json}, 413),
        (user, "GET", "/results/", "/results/?limit=abc", {}, 422),
        (user, "GET", "/results/", "/results/?tenant=someone-else", {}, 403),
        (user, "GET", "/results/export", "/results/export?tenant=someone-else", {}, 403),
        (user, "GET", "/results/export", "/results/export?from=2026-01-01T00:00:00", {}, 422),
        (user, "GET", "/results/{result_id}", "/results/not-a-uuid", {}, 422),
        (user, "GET", "/results/{result_id}", f"/results/{uuid.uuid4()}", {}, 404),
        (user, "POST", "/results/{result_id}/cancel", "/results/not-a-uuid/cancel", {}, 422),
        (user, "GET", "/results/{result_id}/stream", "/results/not-a-uuid/stream", {}, 422),
        (anonymous, "POST", SEND, send, {"headers": UNKNOWN_KEY}, 401),
        (user, "POST", SEND, send, {"headers": {"Prefer": "wait=100"}}, 422),
        (user, "POST", SEND, send, {"json": {"max_tokens": "many"}}, 422),
        (user, "POST", SEND, send, {"content": deep, "headers": as_json}, 422),
        (user, "POST", "/admin/keys", "/admin/keys", {"json": {"tenant": "x", "name": "x"}}, 403),
        (admin, "POST", "/admin/keys", "/admin/keys", {"json": {"tenant": ""}}, 422),
        (admin, "PUT", "/admin/tenants/{tenant}/limits", "/admin/tenants/-bad/limits", {"json": {}}, 422),
        (anonymous, "GET", "/v1/models", "/v1/models", {}, 401),
        (user, "GET", "/v1/models/{model_id}", "/v1/models/no-such-model", {}, 404),
        (anonymous, "POST", "/v1/chat/completions", "/v1/chat/completions", {"json": {}}, 401),
        (user, "POST", "/v1/chat/completions", "/v1/chat/completions", {"json": {"model": 1}}, 400),
        (user, "POST", "/v1/completions", "/v1/completions", {"json": {"model": FAST_MODEL}}, 400),
        (user, "POST", "/v1/completions", "/v1/completions", {"content": huge, "headers": as_json}, 413),
    ]
    for http, method, path, url, kwargs, expected in cases:
        response = await http.request(method, url, **kwargs)
        assert response.status_code == expected, (method, url, response.text)
        assert_documented(spec, method, path, response)


async def test_a_database_outage_is_a_documented_503(triton: Any, enqueued: EnqueueRecorder) -> None:
    # Nothing listens on port 1: the key lookup fails at once.
    app = make_api_app(
        triton.http_url, enqueued, DATABASE_URL="postgresql+psycopg://postgres:postgres@127.0.0.1:1/x"
    )
    async with serve_in_process(app) as http:
        spec = await _spec(http)
        for method, path, body in (
            ("GET", "/contexts/", None),
            ("GET", "/results/", None),
            ("GET", "/models/", None),
            ("POST", "/v1/completions", {"model": FAST_MODEL, "prompt": "hi"}),
        ):
            response = await http.request(method, path, json=body, headers=bearer(ADMIN_KEY))
            assert response.status_code == 503, (method, path, response.text)
            assert_documented(spec, method, path, response)


async def test_send_documents_the_answer_of_a_wait_and_of_an_accepted_job(api_app: InProcessApi) -> None:
    user = api_app.user
    spec = await _spec(api_app.http)
    context_id = (await user.post("/contexts/", json={"content": "hi"})).json()["id"]
    url = SEND.replace("{model_name}", FAST_MODEL).replace("{context_id}", context_id)

    accepted = await user.post(url)
    assert accepted.status_code == 202
    assert_documented(spec, "POST", SEND, accepted)

    # No worker here: the job ends when it is cancelled during the wait.
    waiting = asyncio.create_task(user.post(url, headers={"Prefer": "wait=10"}))
    for _ in range(200):
        pending = (await user.get("/results/", params={"status": "pending"})).json()["items"]
        fresh = [r["id"] for r in pending if r["id"] != accepted.json()["result_id"]]
        if fresh:
            break
        await asyncio.sleep(0.02)
    assert fresh, "the waiting send created no job"
    assert (await user.post(f"/results/{fresh[0]}/cancel")).status_code == 200
    final = await waiting
    assert final.status_code == 200, final.text
    assert final.json()["status"] == "cancelled"
    assert_documented(spec, "POST", SEND, final)

    responses = spec["paths"][SEND]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ResultOut"
    }
    assert set(responses["200"]["headers"]) == {"Location", "Preference-Applied"}
    assert set(responses["202"]["headers"]) == {"Location"}


async def test_fastapi_validation_error_shape_is_gone(api_app: InProcessApi) -> None:
    spec = await _spec(api_app.http)
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text
    assert "#/components/schemas/ValidationError" not in text
    for path, method, op in _operations(spec):
        if "422" in op["responses"]:
            schema = op["responses"]["422"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/InvalidRequest"}, (method, path)


async def test_the_openai_surface_documents_openai_errors_and_no_422(api_app: InProcessApi) -> None:
    spec = await _spec(api_app.http)
    openai_ops = [(path, method, op) for path, method, op in _operations(spec) if is_openai_path(path)]
    assert len(openai_ops) == 4
    for path, method, op in openai_ops:
        assert "422" not in op["responses"], (method, path)
        for status, response in op["responses"].items():
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/OpenAIError"}, (method, path, status)
    models = spec["paths"]["/v1/models"]["get"]["responses"]
    assert set(models) == {"200", "401", "503"}
    assert set(spec["paths"]["/v1/models/{model_id}"]["get"]["responses"]) == {"200", "401", "404", "503"}
    assert "400" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]


async def test_every_operation_but_the_public_ones_documents_the_key_it_needs(api_app: InProcessApi) -> None:
    spec = await _spec(api_app.http)
    for path, method, op in _operations(spec):
        if path in PUBLIC_PATHS:
            assert "security" not in op and "401" not in op["responses"], (method, path)
            continue
        assert op["security"] == [{"apiKey": []}], (method, path)
        assert set(op["responses"]["401"]["headers"]) == {"WWW-Authenticate"}, (method, path)
        assert "503" in op["responses"], (method, path)
        tenant_filter = any(p["in"] == "query" and p["name"] == "tenant" for p in op.get("parameters", []))
        admin_only = path.startswith("/admin/") or path == "/metrics"
        assert ("403" in op["responses"]) is (tenant_filter or admin_only), (method, path)


async def test_the_error_shapes_require_every_field_the_app_always_sends(api_app: InProcessApi) -> None:
    """A client generated from the document may rely on `detail`, `param` and `code` being there."""
    shapes = (await _spec(api_app.http))["components"]["schemas"]
    assert set(shapes["ErrorBody"]["required"]) == {"error", "detail"}
    assert set(shapes["InvalidRequest"]["required"]) == {"error", "detail"}
    assert set(shapes["OpenAIErrorDetail"]["required"]) == {"message", "type", "param", "code"}
