"""app.hotpaths answers the two per-job requests itself and must answer exactly as the routes do.

Each request goes to two apps on the same test transaction: the hot path in front of a
FastAPI app that records what reaches it, and the plain FastAPI app. Well-formed sends and polls
must never reach FastAPI; everything else must, untouched; and both must answer the same."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from app.hotpaths import HotPaths
from tests.conftest import FAST_MODEL, UNLOADED_MODEL, EnqueueRecorder, make_api_app

pytestmark = pytest.mark.anyio


class Recording:
    """Records the requests that reach the app behind the hot path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.calls: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.calls.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


@dataclass
class Apps:
    hot: httpx.AsyncClient
    plain: httpx.AsyncClient
    behind_hot: Recording
    enqueued: EnqueueRecorder


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test")


@pytest.fixture
async def apps(db_connection: AsyncConnection, triton: Any, enqueued: EnqueueRecorder) -> AsyncIterator[Apps]:
    plain_app: Any = make_api_app(db_connection, triton.http_url, enqueued, hot_paths=False)
    behind = Recording(make_api_app(db_connection, triton.http_url, enqueued, hot_paths=False))
    hot_app = HotPaths(behind, state=behind.app.state)  # type: ignore[attr-defined]
    async with _client(hot_app) as hot, _client(plain_app) as plain:
        yield Apps(hot, plain, behind, enqueued)


async def _context(apps: Apps) -> str:
    response = await apps.plain.post("/contexts/", json={"content": "Tell me about hot paths"})
    assert response.status_code == 201
    return str(response.json()["id"])


def _without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("result_id", "created_at", "url")}


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({"max_tokens": 12, "temperature": 0, "seed": 3, "stop": "\n"}, {}),
        (None, {}),
        ({}, {"content-type": "application/json; charset=utf-8"}),
    ],
)
async def test_well_formed_send_and_poll_never_reach_fastapi_and_answer_like_it(
    apps: Apps, body: dict[str, Any] | None, headers: dict[str, str]
) -> None:
    context_id = await _context(apps)
    url = f"/models/send/{FAST_MODEL}/{context_id}"
    hot = await apps.hot.post(url, json=body, headers=headers)
    plain = await apps.plain.post(url, json=body, headers=headers)
    assert apps.behind_hot.calls == []
    assert hot.status_code == plain.status_code == 202, hot.text
    assert _without_ids(hot.json()) == _without_ids(plain.json())
    assert hot.headers["content-type"] == plain.headers["content-type"]
    result_id = hot.json()["result_id"]
    assert hot.headers["location"] == hot.json()["url"] == f"/results/{result_id}"
    assert apps.enqueued.calls == [uuid.UUID(result_id), uuid.UUID(plain.json()["result_id"])]

    # The same row read both ways: byte for byte the same answer, plain and long poll alike.
    for query in ("", "?wait=0", "?wait=0.2"):
        hot_get = await apps.hot.get(f"/results/{result_id}{query}")
        plain_get = await apps.plain.get(f"/results/{result_id}{query}")
        assert hot_get.status_code == plain_get.status_code == 200
        assert hot_get.content == plain_get.content
        assert hot_get.json()["status"] == "pending"
    assert apps.behind_hot.calls == []


async def _same_answer(apps: Apps, method: str, url: str, **kwargs: Any) -> httpx.Response:
    hot = await apps.hot.request(method, url, **kwargs)
    plain = await apps.plain.request(method, url, **kwargs)
    assert (hot.status_code, hot.json()) == (plain.status_code, plain.json())
    assert hot.status_code >= 400
    return hot


@pytest.mark.parametrize(
    ("method", "url", "kwargs"),
    [
        ("POST", "/models/send/no-such-model/{ctx}", {}),
        ("POST", f"/models/send/{UNLOADED_MODEL}/{{ctx}}", {}),
        ("POST", f"/models/send/{FAST_MODEL}/not-a-uuid", {}),
        ("POST", f"/models/send/{FAST_MODEL}/{{ctx}}", {"json": {"max_tokens": 0}}),
        ("POST", f"/models/send/{FAST_MODEL}/{{ctx}}", {"json": {"best_of": 2}}),
        ("POST", f"/models/send/{FAST_MODEL}/{{ctx}}", {"json": [1, 2]}),
        ("POST", f"/models/send/{FAST_MODEL}/{{ctx}}", {"content": b"{not json"}),
        ("GET", "/results/not-a-uuid", {}),
        ("GET", "/results/{missing}?wait=61", {}),
        ("GET", "/results/{missing}?wait=soon", {}),
    ],
)
async def test_what_the_hot_path_does_not_recognise_goes_to_fastapi_untouched(
    apps: Apps, method: str, url: str, kwargs: dict[str, Any]
) -> None:
    url = url.format(ctx=await _context(apps), missing=uuid.uuid4())
    await _same_answer(apps, method, url, **kwargs)
    assert apps.behind_hot.calls == [f"{method} {url.split('?')[0]}"]
    assert apps.enqueued.calls == []


@pytest.mark.parametrize(
    ("method", "url", "kwargs"),
    [
        ("POST", f"/models/send/{FAST_MODEL}/{{missing}}", {}),
        ("POST", f"/models/send/{FAST_MODEL}/{{ctx}}", {"json": {"max_tokens": 100_000}}),
        ("GET", "/results/{missing}", {}),
        ("GET", "/results/{missing}?wait=0.1", {}),
    ],
)
async def test_errors_the_hot_path_answers_itself_are_the_routes_errors(
    apps: Apps, method: str, url: str, kwargs: dict[str, Any]
) -> None:
    url = url.format(ctx=await _context(apps), missing=uuid.uuid4())
    answer = await _same_answer(apps, method, url, **kwargs)
    assert answer.status_code in (404, 422)
    assert apps.behind_hot.calls == []
    assert apps.enqueued.calls == []


async def test_database_down_is_503_on_both_paths(apps: Apps) -> None:
    context_id = await _context(apps)

    @asynccontextmanager
    async def unreachable() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with await psycopg.AsyncConnection.connect("postgresql://postgres@127.0.0.1:1/nowhere") as conn:
            yield conn

    for client_app in (apps.behind_hot.app, apps.plain._transport.app):  # type: ignore[attr-defined]
        client_app.state.connect = unreachable
    for method, url in (
        ("POST", f"/models/send/{FAST_MODEL}/{context_id}"),
        ("GET", f"/results/{uuid.uuid4()}"),
    ):
        answer = await _same_answer(apps, method, url)
        assert answer.status_code == 503
        assert "database is unavailable" in answer.json()["error"]
    assert apps.behind_hot.calls == []
    assert apps.enqueued.calls == []


async def test_the_body_limit_still_applies_in_front_of_the_hot_path(client: httpx.AsyncClient) -> None:
    # `client` is the real create_app() wiring: HotPaths sits inside BodySizeLimit.
    response = await client.post(f"/models/send/{FAST_MODEL}/{uuid.uuid4()}", content=b"x" * 200_000)
    assert response.status_code == 413
    assert "limit" in response.json()["error"]
