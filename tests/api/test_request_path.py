"""One request path: whatever is added to the application applies to every operation it serves,
the two per-job requests (submit, poll) included."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest
from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import AppError, error_response
from tests.conftest import ADMIN_KEY, FAST_MODEL, EnqueueRecorder, bearer, make_api_app, serve_in_process

pytestmark = pytest.mark.anyio

MARKER = "x-test-pass"


class RefuseWithoutHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not any(k == MARKER.encode() for k, _ in scope["headers"]):
            await error_response(418, "refused by the test middleware")(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def refuse_without_header(request: Request) -> None:
    if MARKER not in request.headers:
        raise AppError("refused by the test dependency", status_code=418)


def _operations(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, item in spec["paths"].items() for method in item]


async def _call_each(
    client: httpx.AsyncClient,
    ops: list[tuple[str, str]],
    context_id: str,
    headers: dict[str, str] | None = None,
) -> dict[str, int]:
    headers = headers or {}
    statuses = {}
    for method, template in ops:
        path = template.replace("{model_name}", FAST_MODEL).replace("{context_id}", context_id)
        path = re.sub(r"\{[a-z_]+\}", str(uuid.uuid4()), path)
        body = {"content": "x"} if path == "/contexts/" and method == "POST" else None
        response = await client.request(method, path, json=body, headers={**bearer(ADMIN_KEY), **headers})
        statuses[f"{method} {template}"] = response.status_code
    return statuses


@pytest.mark.parametrize("how", ["middleware", "dependency"])
async def test_what_the_app_adds_applies_to_every_operation(
    how: str, db: object, triton: Any, enqueued: EnqueueRecorder
) -> None:
    app = make_api_app(triton.http_url, enqueued)
    if how == "dependency":
        app = make_api_app(triton.http_url, enqueued, dependencies=[Depends(refuse_without_header)])
    else:
        app.add_middleware(RefuseWithoutHeader)
    async with serve_in_process(app) as client:
        spec = (await client.get("/openapi.json", headers={MARKER: "1"})).json()
        ops = _operations(spec)
        assert ("POST", "/models/send/{model_name}/{context_id}") in ops
        assert ("GET", "/results/{result_id}") in ops
        context_id = (
            await client.post(
                "/contexts/", json={"content": "hi"}, headers={MARKER: "1", **bearer(ADMIN_KEY)}
            )
        ).json()["id"]

        refused = await _call_each(client, ops, context_id)
        assert refused == {op: 418 for op in refused}
        assert enqueued.calls == []  # the refused submit created nothing

        allowed = await _call_each(client, ops, context_id, headers={MARKER: "1"})
        assert all(status != 418 for status in allowed.values()), allowed
        assert allowed["POST /models/send/{model_name}/{context_id}"] == 202
        assert len(enqueued.calls) == 1


async def test_fastapi_opentelemetry_runs_only_when_the_setting_asks_for_it(
    triton: Any, enqueued: EnqueueRecorder
) -> None:
    from opentelemetry import trace

    tracers: list[str] = []

    class Provider(trace.TracerProvider):
        def get_tracer(self, instrumenting_module_name: str, *args: Any, **kwargs: Any) -> trace.Tracer:
            tracers.append(instrumenting_module_name)
            return trace.NoOpTracer()

    trace.set_tracer_provider(Provider())  # the process's provider (once per process)
    for enabled in (False, True):
        app = make_api_app(triton.http_url, enqueued, OPENTELEMETRY=enabled)
        async with serve_in_process(app) as http:
            assert (await http.get("/health")).status_code == 200
        assert bool(tracers) is enabled, tracers


async def test_a_method_a_path_lacks_is_405_allowing_every_method_it_has(
    db: Any, triton: Any, enqueued: EnqueueRecorder
) -> None:
    async with serve_in_process(make_api_app(triton.http_url, enqueued)) as client:
        spec = (await client.get("/openapi.json")).json()
        for path, item in spec["paths"].items():
            concrete = re.sub(r"\{[a-z_]+\}", str(uuid.uuid4()), path.replace("{model_name}", FAST_MODEL))
            response = await client.request("PATCH", concrete, headers=bearer(ADMIN_KEY))
            assert response.status_code == 405, (path, response.text)
            allowed = {method.upper() for method in item}
            allowed |= {"HEAD"} if "GET" in allowed else set()  # app.head answers HEAD as GET
            assert response.headers["allow"] == ", ".join(sorted(allowed)), path


async def test_a_path_without_its_trailing_slash_is_a_relative_307_only_for_a_method_it_takes(
    db: Any, triton: Any, enqueued: EnqueueRecorder
) -> None:
    async with serve_in_process(make_api_app(triton.http_url, enqueued)) as client:
        admin = bearer(ADMIN_KEY)
        # A Host header (sent by a client, or passed on by a proxy) does not choose the Location.
        moved = await client.get("/results?limit=2", headers={**admin, "host": "evil.example:443"})
        assert moved.status_code == 307 and moved.headers["location"] == "/results/?limit=2"
        assert moved.json() == {
            "error": "this path is /results/: follow the redirect (Location)",
            "detail": {"location": "/results/?limit=2"},
        }
        created = await client.post("/contexts", json={"content": "hi"}, headers=admin, follow_redirects=True)
        assert created.status_code == 201 and created.url.path == "/contexts/"
        assert (await client.get("/health/", headers=admin)).headers["location"] == "/health"
        # No route takes DELETE there: no redirect to a 405.
        assert (await client.delete("/contexts", headers=admin)).status_code == 404
        v1 = await client.get("/v1/models/", headers=admin)
        assert v1.status_code == 307 and v1.json()["error"]["message"].startswith("this path is /v1/models")


@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_query_parameter_a_route_does_not_take_is_a_422_naming_it(
    db: Any, triton: Any, enqueued: EnqueueRecorder, fast_path: bool
) -> None:
    """A misspelt filter or wait is refused, not ignored (a listing of everything, a poll answered at
    once); on both paths, and before any side effect. /v1 keeps OpenAI's leniency."""
    app = make_api_app(triton.http_url, enqueued, fast_path=fast_path)
    async with serve_in_process(app) as client:
        client.headers.update(bearer(ADMIN_KEY))
        context_id = (await client.post("/contexts/", json={"content": "hi"})).json()["id"]
        send = f"/models/send/{FAST_MODEL}/{context_id}"
        result_id = (await client.post(send)).json()["result_id"]
        calls = len(enqueued.calls)
        for method, url, takes in [
            ("GET", f"/results/{result_id}?wiat=30", "wait"),
            ("GET", "/results/?statsu=failed&limit=2", "context_id, cursor, limit, model, status, tenant"),
            ("POST", f"{send}?priority=high", "none"),
            ("GET", "/health?verbose", "none"),
        ]:
            response = await client.request(method, url)
            assert response.status_code == 422, (url, response.text)
            unknown = url.split("?")[1].split("&")[0].split("=")[0]
            assert response.json()["error"] == (
                f"invalid request: query.{unknown}: unknown query parameter (this path takes: {takes})"
            )
            assert response.json()["detail"][0]["type"] == "extra_forbidden"
        assert len(enqueued.calls) == calls  # the refused submit created nothing
        listed = await client.get("/results/?status=pending&limit=2")
        assert listed.status_code == 200 and listed.json()["items"]
        assert (await client.get(f"/results/{result_id}?wait=0")).status_code == 200
        assert (await client.get("/v1/models?api-version=2024-10-21")).status_code == 200


@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_one_value_query_parameter_sent_twice_is_a_422_naming_it(
    db: Any, triton: Any, enqueued: EnqueueRecorder, fast_path: bool
) -> None:
    """`?limit=1&limit=3` would list 3, `?wait=abc&wait=0` answer at once: which value counts is not
    the client's to guess. List-valued parameters stay repeatable."""
    app = make_api_app(triton.http_url, enqueued, fast_path=fast_path)
    async with serve_in_process(app) as client:
        client.headers.update(bearer(ADMIN_KEY))
        context_id = (await client.post("/contexts/", json={"content": "hi"})).json()["id"]
        send = f"/models/send/{FAST_MODEL}/{context_id}"
        result_id = (await client.post(send)).json()["result_id"]
        for url, name in [
            ("/results/?limit=1&limit=3", "limit"),
            (f"/results/{result_id}?wait=abc&wait=0", "wait"),
            ("/contexts/?limit=2&cursor=a&limit=2", "limit"),
        ]:
            response = await client.get(url)
            assert response.status_code == 422, (url, response.text)
            assert response.json()["error"] == (
                f"invalid request: query.{name}: takes one value, and was sent more than once: send it once"
            )
            assert response.json()["detail"][0]["type"] == "repeated_parameter"
        listed = await client.get("/results/?status=pending&status=failed&limit=2")
        assert listed.status_code == 200 and listed.json()["items"]


async def test_cors_answers_the_configured_origins_only(
    db: Any, triton: Any, enqueued: EnqueueRecorder
) -> None:
    """A dashboard on another origin can call the API from a browser: its preflight (no key) is
    answered, and every answer, a 401 included, lets the page read it; other origins get nothing."""
    page = "https://dashboard.example.com"
    app = make_api_app(triton.http_url, enqueued, CORS_ALLOW_ORIGINS=f"{page}, https://ops.example.com")
    async with serve_in_process(app) as client:
        preflight = await client.options(
            "/results/",
            headers={
                "origin": page,
                "access-control-request-method": "GET",
                "access-control-request-headers": "authorization",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == page
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        listed = await client.get("/results/", headers={"origin": page, **bearer(ADMIN_KEY)})
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == page
        refused = await client.get("/results/", headers={"origin": page})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == page
        context_id = (
            await client.post("/contexts/", json={"content": "hi"}, headers=bearer(ADMIN_KEY))
        ).json()["id"]
        sent = await client.post(
            f"/models/send/{FAST_MODEL}/{context_id}", headers={"origin": page, **bearer(ADMIN_KEY)}
        )
        assert sent.status_code == 202 and "location" in sent.headers["access-control-expose-headers"].lower()
        other = await client.get("/results/", headers={"origin": "https://evil.example", **bearer(ADMIN_KEY)})
        assert "access-control-allow-origin" not in other.headers
        bad_preflight = await client.options(
            "/results/", headers={"origin": "https://evil.example", "access-control-request-method": "GET"}
        )
        assert bad_preflight.status_code == 400
    async with serve_in_process(make_api_app(triton.http_url, enqueued)) as client:  # not configured
        answer = await client.get("/results/", headers={"origin": page, **bearer(ADMIN_KEY)})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


@pytest.mark.parametrize("origins", ["*", "https://dash.example.com/app", "dash.example.com"])
def test_cors_origins_must_be_origins(origins: str) -> None:
    from pydantic import ValidationError

    from app.config import Settings

    with pytest.raises(ValidationError, match="is not an origin like"):
        Settings(CORS_ALLOW_ORIGINS=origins)
