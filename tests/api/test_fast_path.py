"""Submit and poll answered by app.fastpath give exactly FastAPI's answers, and the fast path steps
aside for a route it cannot bind exactly as FastAPI would."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, Request

from app.fastpath import FastPath
from tests.conftest import (
    FAST_MODEL,
    UNLOADED_MODEL,
    EnqueueRecorder,
    bearer,
    make_api_app,
    make_key,
    serve_in_process,
)

pytestmark = pytest.mark.anyio


def _fast_path_of(app: Any) -> FastPath:
    layer = app.middleware_stack or app.build_middleware_stack()
    while not isinstance(layer, FastPath):
        layer = layer.app
    return layer


@pytest.fixture
async def both(
    db: object, triton: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, EnqueueRecorder]]:
    """The same database and tenant through an app with the fast path and one without."""
    enqueued = EnqueueRecorder()
    fast_app = make_api_app(triton.http_url, enqueued)
    plain_app = make_api_app(triton.http_url, enqueued, fast_path=False)
    async with serve_in_process(fast_app) as fast, serve_in_process(plain_app) as plain:
        key = await make_key(fast, "fastpath")
        fast.headers.update(bearer(key))
        plain.headers.update(bearer(key))
        assert _fast_path_of(fast_app).served() == [
            "/models/send/{model_name}/{context_id}",
            "/results/{result_id}",
            "/v1/chat/completions",
            "/v1/completions",
        ]
        yield fast, plain, enqueued


def _comparable(response: httpx.Response, *ids: str) -> tuple[int, Any, str | None]:
    body: Any = response.json()
    text = json.dumps(body, sort_keys=True)
    for i, rid in enumerate(ids):
        text = text.replace(rid, f"<id{i}>")
    for field in ("created_at", "updated_at", "started_at", "finished_at"):
        text = _drop(text, field)
    return response.status_code, json.loads(text), response.headers.get("content-type")


def _drop(text: str, field: str) -> str:
    data = json.loads(text)
    if isinstance(data, dict):
        data.pop(field, None)
    return json.dumps(data, sort_keys=True)


JSON = {"content-type": "application/json"}
CASES: list[tuple[str, str, dict[str, str], bytes | None]] = [
    (
        "POST",
        "/models/send/{model}/{ctx}",
        {"content-type": "application/json"},
        b'{"max_tokens": 4, "seed": 1}',
    ),
    ("POST", "/models/send/{model}/{ctx}", {}, None),
    ("POST", "/models/send/{model}/{ctx}", {"content-type": "application/json"}, b'{"max_tokens": 0}'),
    ("POST", "/models/send/{model}/{ctx}", {"content-type": "application/json"}, b'{"max_tokens": 100000}'),
    ("POST", "/models/send/{model}/{ctx}", {"content-type": "application/json"}, b'{"nope": 1}'),
    ("POST", "/models/send/{model}/{ctx}", {"content-type": "application/json"}, b"{not json"),
    ("POST", "/models/send/{model}/{ctx}", {"content-type": "text/plain"}, b'{"max_tokens": 4}'),
    ("POST", "/models/send/{model}/{ctx}", {"content-type": "application/json"}, b"[" * 50_000),
    ("POST", "/models/send/{model}/{ctx}", {"content-type": "application/json"}, b'{"stop": ["a\\u0000b"]}'),
    ("POST", "/models/send/{model}/not-a-uuid", {}, None),
    ("POST", "/models/send/{model}/{missing}", {}, None),
    ("POST", "/models/send/no-such-model/{ctx}", {}, None),
    ("POST", f"/models/send/{UNLOADED_MODEL}/{{ctx}}", {}, None),
    ("GET", "/results/{rid}", {}, None),
    ("GET", "/results/{rid}?wait=0.1", {}, None),
    ("GET", "/results/{rid}?wait=61", {}, None),
    ("GET", "/results/{rid}?wait=nan", {}, None),
    ("GET", "/results/{rid}?wait=abc", {}, None),
    ("GET", "/results/{missing}", {}, None),
    ("GET", "/results/not-a-uuid", {}, None),
    # The OpenAI calls' refusals (an accepted call waits for a worker, which this app has not).
    ("POST", "/v1/chat/completions", JSON, b'{"model": "{model}"}'),
    ("POST", "/v1/chat/completions", JSON, b"{not json"),
    ("POST", "/v1/chat/completions", {}, None),
    (
        "POST",
        "/v1/chat/completions",
        JSON,
        b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}',
    ),
    (
        "POST",
        "/v1/chat/completions",
        JSON,
        b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "logprobs": true}',
    ),
    (
        "POST",
        "/v1/chat/completions",
        JSON,
        b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}',
    ),
    (
        "POST",
        "/v1/chat/completions",
        JSON,
        b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}',
    ),
    ("POST", "/v1/completions", JSON, b'{"model": "{model}", "prompt": "x", "n": 1000}'),
    ("POST", "/v1/completions", JSON, b'{"model": "{model}"}'),
    (
        "POST",
        "/v1/completions",
        {**JSON, "idempotency-key": "k" * 300},
        b'{"model": "{model}", "prompt": "x"}',
    ),
]


@pytest.mark.parametrize(("method", "template", "headers", "body"), CASES)
async def test_the_fast_path_answers_as_fastapi_does(
    both: tuple[httpx.AsyncClient, httpx.AsyncClient, EnqueueRecorder],
    method: str,
    template: str,
    headers: dict[str, str],
    body: bytes | None,
) -> None:
    fast, plain, enqueued = both
    ctx = (await fast.post("/contexts/", json={"content": "compare"})).json()["id"]
    rid = (await plain.post(f"/models/send/{FAST_MODEL}/{ctx}")).json()["result_id"]
    path = template.format(model=FAST_MODEL, ctx=ctx, rid=rid, missing=uuid.uuid4())
    if body is not None:
        body = body.replace(b"{model}", FAST_MODEL.encode())
    before = len(enqueued.calls)
    answers = [await client.request(method, path, headers=headers, content=body) for client in (fast, plain)]
    new_ids = [str(i) for i in enqueued.calls[before:]]
    assert len(new_ids) in (0, 2)
    if new_ids:  # each answer names its own new job
        assert [a.json()["result_id"] for a in answers] == new_ids
        assert [a.headers["location"] for a in answers] == [f"/results/{i}" for i in new_ids]
    assert _comparable(answers[0], ctx, rid, *new_ids[:1]) == _comparable(answers[1], ctx, rid, *new_ids[1:])


async def test_a_dependency_added_to_the_app_turns_the_fast_path_off(db: object, triton: Any) -> None:
    seen: list[str] = []

    async def audit(request: Request) -> None:
        seen.append(request.url.path)

    app = make_api_app(triton.http_url, EnqueueRecorder(), dependencies=[Depends(audit)])
    async with serve_in_process(app) as client:
        client.headers.update(bearer(await make_key(client, "audited")))
        assert _fast_path_of(app).served() == []
        ctx = (await client.post("/contexts/", json={"content": "x"})).json()["id"]
        rid = (await client.post(f"/models/send/{FAST_MODEL}/{ctx}")).json()["result_id"]
        await client.get(f"/results/{rid}")
    assert seen[-2:] == [f"/models/send/{FAST_MODEL}/{ctx}", f"/results/{rid}"]
