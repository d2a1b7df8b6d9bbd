"""The OpenAI-compatible surface, in process, against the real database and the real local Triton:
what a call records (one job per choice, the rendered prompt, the parameters) and every refusal in
OpenAI's error shape. No worker runs here, so a call ends at its (short) wait with a 504 naming its
jobs; the answers themselves are proven end to end with the official client in tests/e2e/test_openai.py."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from app.errors import DATABASE_DOWN
from tests.conftest import (
    ADMIN_KEY,
    FAST_MODEL,
    SIM_MODELS,
    SLOW_MODEL,
    UNLOADED_MODEL,
    EnqueueRecorder,
    bearer,
    make_api_app,
    make_key,
    serve_in_process,
)

pytestmark = pytest.mark.anyio

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


class V1:
    def __init__(self, http: httpx.AsyncClient, user: httpx.AsyncClient, tenant: str) -> None:
        self.http, self.user, self.tenant = http, user, tenant

    async def client_of(self, tenant: str, **limits: int) -> httpx.AsyncClient:
        key = await make_key(self.http, tenant, **limits)
        return httpx.AsyncClient(
            transport=self.http._transport, base_url="http://api.test", headers=bearer(key)
        )


@pytest.fixture
async def v1(db: psycopg.AsyncConnection[Any], triton: Any, enqueued: EnqueueRecorder) -> AsyncIterator[V1]:
    app = make_api_app(
        triton.http_url, enqueued, CHAT_TEMPLATES_DIRS=str(SIM_MODELS), OPENAI_WAIT_S=0.3, EXPORT_PAGE_SIZE=2
    )
    async with serve_in_process(app) as http:
        tenant = f"tenant-{uuid.uuid4().hex[:8]}"
        key = await make_key(http, tenant)
        async with httpx.AsyncClient(
            transport=http._transport, base_url="http://api.test", headers=bearer(key)
        ) as user:
            yield V1(http, user, tenant)


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": FAST_MODEL, "messages": [{"role": "user", "content": "Hello there"}], **fields}


async def test_a_chat_call_makes_one_job_per_choice_with_the_rendered_prompt(
    v1: V1, enqueued: EnqueueRecorder, db: psycopg.AsyncConnection[Any]
) -> None:
    body = _chat(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
        n=2,
        max_completion_tokens=7,
        temperature=0.5,
        stop="x",
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        user="u-42",
        metadata={"run": "r1"},
        chat_template_kwargs={"enable_thinking": False},
    )
    response = await v1.user.post("/v1/chat/completions", json=body)

    # Nothing runs the jobs here: the call gives up waiting, naming the jobs (which go on).
    assert response.status_code == 504, response.text
    error = _error(response)
    assert error["code"] == "job_timeout" and error["type"] == "server_error"
    assert response.headers["x-should-retry"] == "false"
    ids = response.headers["x-result-id"].split(",")
    assert len(ids) == 2 and all(rid in error["message"] for rid in ids)
    assert enqueued.calls == [uuid.UUID(rid) for rid in ids]

    for index, rid in enumerate(ids):
        result = (await v1.user.get(f"/results/{rid}")).json()
        assert result["status"] == "pending"
        assert result["model"] == FAST_MODEL
        assert result["params"] == {
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 1.0,
            "stop": ["x"],
            "seed": 11 + index,  # each choice its own seed, else both would be the same text
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "chat": True,
            "openai": {
                "n": 2,
                "index": index,
                "user": "u-42",
                "metadata": {"run": "r1"},
                "chat_template_kwargs": {"enable_thinking": False},
            },
        }
    rows = await (
        await db.execute(
            "SELECT r.prompt, c.content, r.context_id FROM result r JOIN context c ON c.id = r.context_id "
            "WHERE r.id = ANY(%s::uuid[])",
            (ids,),
        )
    ).fetchall()
    assert {row[2] for row in rows} == {rows[0][2]}  # one context, two jobs
    assert rows[0][0] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert json.loads(rows[0][1]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    ]


async def test_a_completion_of_several_prompts_makes_a_context_and_a_job_each(
    v1: V1, enqueued: EnqueueRecorder, db: psycopg.AsyncConnection[Any]
) -> None:
    response = await v1.user.post(
        "/v1/completions", json={"model": FAST_MODEL, "prompt": ["one two", "three four"], "max_tokens": 5}
    )
    assert response.status_code == 504, response.text
    ids = response.headers["x-result-id"].split(",")
    assert len(ids) == 2 and len(enqueued.calls) == 2
    rows = await (
        await db.execute(
            "SELECT c.content, r.prompt, r.params FROM result r JOIN context c ON c.id = r.context_id "
            "WHERE r.id = ANY(%s::uuid[]) ORDER BY c.content",
            (ids,),
        )
    ).fetchall()
    assert [(content, prompt) for content, prompt, _ in rows] == [("one two", None), ("three four", None)]
    assert all("chat" not in params and params["max_tokens"] == 5 for *_, params in rows)


async def test_completions_default_to_openais_16_tokens_and_chat_to_the_setting(v1: V1) -> None:
    completion = await v1.user.post("/v1/completions", json={"model": FAST_MODEL, "prompt": "hi"})
    chat = await v1.user.post("/v1/chat/completions", json=_chat())
    for response, expected in ((completion, 16), (chat, 256)):
        rid = response.headers["x-result-id"]
        assert (await v1.user.get(f"/results/{rid}")).json()["params"]["max_tokens"] == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ("logit_bias", {"50256": -100}),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("best_of", 3),
        ("echo", True),
        ("suffix", "end"),
        ("something_new", 1),
    ],
)
async def test_a_field_that_would_change_the_answer_is_refused_by_name(
    v1: V1, enqueued: EnqueueRecorder, field: str, value: Any
) -> None:
    path = "/v1/completions" if field in ("best_of", "echo", "suffix") else "/v1/chat/completions"
    body = {"model": FAST_MODEL, "prompt": "x"} if path == "/v1/completions" else _chat()
    response = await v1.user.post(path, json={**body, field: value})
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert error["type"] == "invalid_request_error"
    assert f"'{field}' is not supported" in error["message"]
    assert enqueued.calls == []


async def test_values_that_change_nothing_are_accepted(v1: V1) -> None:
    response = await v1.user.post(
        "/v1/chat/completions",
        json=_chat(
            logprobs=False,
            response_format={"type": "text"},
            store=False,
            parallel_tool_calls=True,
            temperature=1,  # an integer where a number goes is a number
            top_p=1,
        ),
    )
    assert response.status_code == 504  # accepted: created, then not finished here


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_chat(temperature=5), "temperature"),
        (_chat(messages=[]), "messages"),
        (_chat(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
        (_chat(n=0), "n"),
        (_chat(n=17), "n"),
        (_chat(max_tokens=100_000), "max_tokens"),
        (_chat(max_tokens=5, max_completion_tokens=6), "max_completion_tokens"),
        (_chat(stop=["a"] * 17), "stop"),
        (_chat(chat_template_kwargs={"messages": []}), "chat_template_kwargs.messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        # Strings Postgres cannot store (NUL, a lone surrogate), wherever they hide.
        (_chat(metadata={"a": "\x00"}), "metadata.a"),
        (_chat(metadata={"a\x00": "b"}), "metadata"),
        (_chat(chat_template_kwargs={"a": {"b": ["\x00"]}}), "chat_template_kwargs"),
        (_chat(chat_template_kwargs={"a\x00": 1}), "chat_template_kwargs"),
        (_chat(messages=[{"role": "user", "content": "x", "name": "a\x00"}]), "messages.0.name"),
        (_chat(stream_options={"include_usage": True}), "stream_options"),
        (_chat(stream=False, stream_options={"include_usage": True}), "stream_options"),
        # Types are OpenAI's: no string for a number, no boolean for a count, no float for an integer.
        (_chat(max_tokens="5"), "max_tokens"),
        (_chat(n=True), "n"),
        (_chat(stream="yes"), "stream"),
        (_chat(stream=1), "stream"),
        (_chat(seed=1e18), "seed"),
        (_chat(temperature="0.5"), "temperature"),
        ({"model": FAST_MODEL, "prompt": ""}, "prompt"),
    ],
)
async def test_a_bad_field_is_400_naming_it(
    v1: V1, enqueued: EnqueueRecorder, body: dict[str, Any], param: str
) -> None:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    response = await v1.user.post(path, json=body)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error
    assert enqueued.calls == []


async def test_a_body_that_is_not_json_is_400(v1: V1) -> None:
    response = await v1.user.post(
        "/v1/chat/completions", content=b'{"model": "x",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] is None  # not a field: where the JSON breaks is in the message
    assert "JSON decode error at character 14" in error["message"]


async def test_a_lone_surrogate_is_400_naming_its_field(v1: V1, enqueued: EnqueueRecorder) -> None:
    for field in ('"chat_template_kwargs": {"a": "\\ud800"}', '"metadata": {"a": "x\\udc00"}'):
        body = f'{{"model": "{FAST_MODEL}", "messages": [{{"role": "user", "content": "x"}}], {field}}}'
        response = await v1.user.post(
            "/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert _error(response)["param"] in ("chat_template_kwargs", "metadata.a")
    assert enqueued.calls == []


async def test_param_names_the_field_not_the_branch_of_a_union(v1: V1) -> None:
    response = await v1.user.post(
        "/v1/chat/completions",
        json=_chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
    )
    assert response.status_code == 400
    assert _error(response)["param"] == "messages.0.content"


async def test_unknown_model_is_404_model_not_found(v1: V1, enqueued: EnqueueRecorder) -> None:
    response = await v1.user.post("/v1/chat/completions", json=_chat(model="no-such-model"))
    assert response.status_code == 404
    error = _error(response)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no-such-model" in error["message"] and FAST_MODEL in error["message"]
    for unknown in ("no-such-model", "m" * 300):
        missing = await v1.user.get(f"/v1/models/{unknown}")
        assert missing.status_code == 404 and _error(missing)["code"] == "model_not_found"
    assert enqueued.calls == []


async def test_a_bad_key_is_401_in_openais_shape_under_v1_only(v1: V1) -> None:
    for headers in ({}, bearer("llmq_" + "x" * 40), {"authorization": "Basic abc"}):
        response = await v1.http.post("/v1/chat/completions", json=_chat(), headers=headers)
        assert response.status_code == 401
        error = _error(response)
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"  # as OpenAI
    elsewhere = await v1.http.get("/results/", headers=bearer("llmq_" + "x" * 40))
    assert elsewhere.status_code == 401 and isinstance(elsewhere.json()["error"], str)


async def test_over_the_pending_quota_is_429(v1: V1, enqueued: EnqueueRecorder) -> None:
    limited = await v1.client_of(f"q-{uuid.uuid4().hex[:8]}", max_pending=1)
    first = await limited.post("/v1/chat/completions", json=_chat())
    assert first.status_code == 504  # its job is still pending
    second = await limited.post("/v1/chat/completions", json=_chat())
    assert second.status_code == 429
    error = _error(second)
    assert error["type"] == "rate_limit_error" and error["code"] == "max_pending"
    assert "pending job limit" in error["message"] and second.headers["retry-after"]
    assert len(enqueued.calls) == 1


async def test_the_pending_quota_counts_every_job_of_a_call(v1: V1, enqueued: EnqueueRecorder) -> None:
    limited = await v1.client_of(f"q-{uuid.uuid4().hex[:8]}", max_pending=3)
    async with limited:
        too_many = await limited.post("/v1/completions", json={"model": FAST_MODEL, "prompt": ["a"] * 4})
        assert too_many.status_code == 400  # could never fit: not worth a retry
        assert _error(too_many)["code"] == "max_pending" and "creates 4 jobs" in _error(too_many)["message"]
        first = await limited.post("/v1/chat/completions", json=_chat())
        assert first.status_code == 504  # its job is still pending
        over = await limited.post("/v1/completions", json={"model": FAST_MODEL, "prompt": ["a", "b", "c"]})
        assert over.status_code == 429
        assert "has 1 jobs pending and this request would add 3" in _error(over)["message"]
        assert (await limited.post("/v1/chat/completions", json=_chat(n=2))).status_code == 504
    assert len(enqueued.calls) == 3


async def test_a_repeated_call_is_answered_from_its_jobs_whatever_the_quota(
    v1: V1, enqueued: EnqueueRecorder
) -> None:
    limited = await v1.client_of(f"q-{uuid.uuid4().hex[:8]}", max_pending=1)
    async with limited:
        headers = {"Idempotency-Key": "one-call"}
        first = await limited.post("/v1/chat/completions", json=_chat(), headers=headers)
        again = await limited.post("/v1/chat/completions", json=_chat(), headers=headers)
        assert first.status_code == again.status_code == 504, again.text  # pending, not refused
        assert first.headers["x-result-id"] == again.headers["x-result-id"]
    assert len(enqueued.calls) == 1


async def test_a_chat_call_to_a_model_without_a_template_is_400(
    db: psycopg.AsyncConnection[Any], triton: Any, tmp_path: Path
) -> None:
    app = make_api_app(triton.http_url, EnqueueRecorder(), CHAT_TEMPLATES_DIRS=str(tmp_path))
    async with serve_in_process(app) as http:
        response = await http.post("/v1/chat/completions", json=_chat(), headers=bearer(ADMIN_KEY))
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "no_chat_template" and "has no chat template" in error["message"]


async def test_the_model_list_is_triton_s(v1: V1) -> None:
    response = await v1.user.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id[FAST_MODEL] == {
        "id": FAST_MODEL,
        "object": "model",
        "created": 0,
        "owned_by": "triton",
        "ready": True,
    }
    assert SLOW_MODEL in by_id
    one = await v1.user.get(f"/v1/models/{FAST_MODEL}")
    assert one.status_code == 200 and one.json() == by_id[FAST_MODEL]


# ---------------------------------------------------------------- images


async def test_an_image_goes_with_the_job_of_a_vision_model(v1: V1, db: psycopg.AsyncConnection[Any]) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
    ]
    response = await v1.user.post(
        "/v1/chat/completions",
        json=_chat(
            messages=[
                {"role": "user", "content": content},
                {"role": "user", "content": "And this?", "image": f"![a picture]({PNG_URL})"},
            ]
        ),
    )
    assert response.status_code == 504, response.text
    rid = response.headers["x-result-id"]
    result = (await v1.user.get(f"/results/{rid}")).json()
    # The job keeps its images; a poll counts them instead of sending them again.
    assert "image" not in result["params"] and result["images"] == 2
    listed = (await v1.user.get("/results/")).json()["items"]
    assert [(item["id"], item["images"], "image" in item["params"]) for item in listed] == [(rid, 2, False)]
    row = await (
        await db.execute(
            "SELECT r.prompt, c.content, r.params FROM result r JOIN context c ON c.id = r.context_id WHERE r.id = %s",
            (rid,),
        )
    ).fetchone()
    assert row is not None
    assert row[2]["image"] == [base64.b64encode(PNG).decode()] * 2
    assert row[0] == (
        "<|im_start|>user\nWhat is this?\n<image><|im_end|>\n<|im_start|>user\nAnd this?\n<image><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "base64" not in row[1]  # the conversation refers to the images, kept once in the job's parameters


@pytest.mark.parametrize(
    ("model", "url", "message"),
    [
        (SLOW_MODEL, PNG_URL, "does not take images"),
        (FAST_MODEL, "https://example.com/cat.png", "remote image URLs are not fetched"),
        (FAST_MODEL, "http://169.254.169.254/latest/meta-data", "remote image URLs are not fetched"),
        (FAST_MODEL, "file:///etc/passwd", "must be a data: URL"),
        (FAST_MODEL, "data:image/png;base64,!!!", "not valid base64"),
        (FAST_MODEL, "data:image/gif;base64,R0lGODlh", "expected a data:image/png or data:image/jpeg"),
        (
            FAST_MODEL,
            "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
            "neither PNG nor JPEG",
        ),
        (
            FAST_MODEL,
            "data:image/png;base64," + base64.b64encode(PNG + b"\x00" * 2048).decode(),
            "over the limit",
        ),
    ],
)
async def test_images_are_refused_with_a_clear_400(
    db: psycopg.AsyncConnection[Any], triton: Any, model: str, url: str, message: str
) -> None:
    enqueued = EnqueueRecorder()
    app = make_api_app(
        triton.http_url, enqueued, CHAT_TEMPLATES_DIRS=str(SIM_MODELS), OPENAI_MAX_IMAGE_BYTES=1024
    )
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    async with serve_in_process(app) as http:
        response = await http.post(
            "/v1/chat/completions",
            json=_chat(model=model, messages=[{"role": "user", "content": content}]),
            headers=bearer(ADMIN_KEY),
        )
    assert response.status_code == 400, response.text
    error = _error(response)
    assert message in error["message"]
    assert error["param"] == "messages.0.content.1.image_url.url"
    assert enqueued.calls == []


# ---------------------------------------------------------------- export


async def _finish(db: psycopg.AsyncConnection[Any], rid: str, status: str, output: str | None) -> None:
    # The worker's outcome, written as it writes it (this test has no worker).
    await db.execute(
        "UPDATE result SET status = %s, output = %s, finish_reason = 'length', prompt_tokens = 3, "
        "completion_tokens = 2, finished_at = now() WHERE id = %s",
        (status, output, rid),
    )


async def test_export_streams_finished_jobs_as_json_lines_page_by_page(
    v1: V1, db: psycopg.AsyncConnection[Any]
) -> None:
    ids = []
    for i in range(5):  # pages of 2 (EXPORT_PAGE_SIZE): three pages
        response = await v1.user.post(
            "/v1/chat/completions",
            json=_chat(messages=[{"role": "user", "content": f"question {i}"}], seed=i),
        )
        ids.append(response.headers["x-result-id"])
    completion = (await v1.user.post("/v1/completions", json={"model": FAST_MODEL, "prompt": "raw"})).headers[
        "x-result-id"
    ]
    for rid in ids:
        await _finish(db, rid, "completed", f"answer to {rid}")
    await _finish(db, completion, "failed", None)
    other = await v1.client_of("someone-else")
    hidden = (await other.post("/v1/completions", json={"model": FAST_MODEL, "prompt": "theirs"})).headers[
        "x-result-id"
    ]
    await _finish(db, hidden, "completed", "theirs")
    pending = (await v1.user.post("/v1/completions", json={"model": FAST_MODEL, "prompt": "later"})).headers[
        "x-result-id"
    ]

    response = await v1.user.get("/results/export")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["id"] for line in lines] == [*ids, completion]  # oldest first, only finished, only ours
    first = lines[0]
    assert first["messages"] == [{"role": "user", "content": "question 0"}]
    assert first["response"] == f"answer to {ids[0]}"
    assert (
        first["model"] == FAST_MODEL and first["status"] == "completed" and first["finish_reason"] == "length"
    )
    assert first["parameters"]["seed"] == 0 and first["parameters"]["openai"]["n"] == 1
    assert first["tokens"] == {"prompt": 3, "completion": 2}
    assert first["rendered_prompt"].startswith("<|im_start|>user\nquestion 0")
    assert lines[-1]["prompt"] == "raw" and lines[-1]["status"] == "failed"
    assert hidden not in response.text and pending not in response.text

    only_failed = await v1.user.get("/results/export", params={"status": "failed"})
    assert [json.loads(x)["id"] for x in only_failed.text.splitlines()] == [completion]
    since = lines[2]["timestamp"]
    ranged = await v1.user.get("/results/export", params={"from": since, "to": lines[4]["timestamp"]})
    assert [json.loads(x)["id"] for x in ranged.text.splitlines()] == ids[2:4]
    assert (await v1.user.get("/results/export", params={"model": "other"})).text == ""
    admin = await v1.http.get("/results/export", params={"tenant": "someone-else"}, headers=bearer(ADMIN_KEY))
    assert [json.loads(x)["id"] for x in admin.text.splitlines()] == [hidden]


async def test_an_export_cut_by_the_database_ends_with_a_line_saying_why(
    v1: V1, db: psycopg.AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.services import export as export_service

    for i in range(3):  # pages of 2: the second page's read fails
        rid = (await v1.user.post("/v1/completions", json={"model": FAST_MODEL, "prompt": f"p{i}"})).headers[
            "x-result-id"
        ]
        await _finish(db, rid, "completed", f"answer {i}")
    pages_read = 0
    read_page = export_service.repo.export_page

    async def failing_after_one_page(*args: Any, **kwargs: Any) -> Any:
        nonlocal pages_read
        pages_read += 1
        if pages_read > 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await read_page(*args, **kwargs)

    monkeypatch.setattr(export_service.repo, "export_page", failing_after_one_page)
    response = await v1.user.get("/results/export")
    assert response.status_code == 200  # the first page had gone out
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["response"] for line in lines[:2]] == ["answer 0", "answer 1"]
    assert lines[2:] == [{"error": DATABASE_DOWN, "detail": {"status": 503}}]


async def test_export_refuses_bad_filters(v1: V1) -> None:
    backwards = {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}
    answer = await v1.user.get("/results/export", params=backwards)
    assert (
        answer.status_code == 422 and "'from' (2026-02-01T00:00:00+00:00) must be before 'to'" in answer.text
    )
    for params in ({"status": "pending"}, {"from": "2026-01-01T00:00:00"}, {"from": "yesterday"}):
        response = await v1.user.get("/results/export", params=params)
        assert response.status_code == 422, (params, response.text)


async def test_an_idempotency_key_answers_from_the_same_jobs(v1: V1, enqueued: EnqueueRecorder) -> None:
    headers = {"Idempotency-Key": f"call-{uuid.uuid4()}"}
    first = await v1.user.post("/v1/chat/completions", json=_chat(n=2), headers=headers)
    again = await v1.user.post("/v1/chat/completions", json=_chat(n=2), headers=headers)
    assert first.status_code == again.status_code == 504
    assert first.headers["x-result-id"] == again.headers["x-result-id"]
    assert len(enqueued.calls) == 2  # created (and enqueued) once
    other = await v1.user.post("/v1/chat/completions", json=_chat(n=1), headers=headers)
    assert other.status_code == 400 and "already used with a different request" in _error(other)["message"]
    assert _error(other)["param"] == "header.Idempotency-Key"


async def test_a_remote_image_is_fetched_only_from_an_allowed_host(
    db: psycopg.AsyncConnection[Any], triton: Any
) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Images(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("content-length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)
            else:  # a redirect is not followed: it could lead off the allowed hosts
                self.send_response(302)
                self.send_header("location", "http://169.254.169.254/")
                self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    app = make_api_app(
        triton.http_url,
        EnqueueRecorder(),
        CHAT_TEMPLATES_DIRS=str(SIM_MODELS),
        OPENAI_WAIT_S=0.2,
        OPENAI_IMAGE_HOSTS="127.0.0.1",
    )
    try:
        async with serve_in_process(app) as http:

            async def call(url: str) -> httpx.Response:
                content = [{"type": "image_url", "image_url": {"url": url}}]
                return await http.post(
                    "/v1/chat/completions",
                    json=_chat(messages=[{"role": "user", "content": content}]),
                    headers=bearer(ADMIN_KEY),
                )

            fetched = await call(f"{base}/cat.png")
            assert fetched.status_code == 504, fetched.text  # accepted: the job exists
            rid = fetched.headers["x-result-id"]
            assert (await http.get(f"/results/{rid}", headers=bearer(ADMIN_KEY))).json()["images"] == 1
            stored = await (await db.execute("SELECT params FROM result WHERE id = %s", (rid,))).fetchone()
            assert stored is not None and stored[0]["image"] == [base64.b64encode(PNG).decode()]
            redirected = await call(f"{base}/elsewhere")
            assert redirected.status_code == 400 and "HTTP 302" in _error(redirected)["message"]
            other_host = await call("http://localhost:1/cat.png")
            assert other_host.status_code == 400 and "not allowed" in _error(other_host)["message"]
    finally:
        server.shutdown()


@pytest.fixture
async def v1_waiting(
    db: psycopg.AsyncConnection[Any], triton: Any, enqueued: EnqueueRecorder
) -> AsyncIterator[V1]:
    """As `v1`, with calls that wait 2 s for their jobs (no worker runs them)."""
    app = make_api_app(triton.http_url, enqueued, CHAT_TEMPLATES_DIRS=str(SIM_MODELS), OPENAI_WAIT_S=2.0)
    async with serve_in_process(app) as http:
        tenant = f"tenant-{uuid.uuid4().hex[:8]}"
        key = await make_key(http, tenant)
        async with httpx.AsyncClient(
            transport=http._transport, base_url="http://api.test", headers=bearer(key), timeout=30
        ) as user:
            yield V1(http, user, tenant)


async def _allow_connections(api_db_url: str, allowed: bool) -> None:
    """Let connections to the API's database in, or refuse them and end its sessions (the server's
    own refusal, as in an outage)."""
    base, name = api_db_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)
    async with await psycopg.AsyncConnection.connect(f"{base}/postgres", autocommit=True) as admin:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


async def _cut_database_once_a_job_exists(db: psycopg.AsyncConnection[Any], api_db_url: str) -> list[str]:
    """Wait for the call's job row, then cut the API's database; the ids of the jobs."""
    while not (rows := await (await db.execute("SELECT id FROM result")).fetchall()):
        await asyncio.sleep(0.02)
    await _allow_connections(api_db_url, False)
    return [str(row[0]) for row in rows]


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
async def test_an_outage_after_the_jobs_exist_says_they_go_on_and_forbids_a_retry(
    v1_waiting: V1, db: psycopg.AsyncConnection[Any], api_db_url: str, stream: bool
) -> None:
    """An outage once a call's jobs exist must not answer "nothing was changed, try again": the
    SDK would send the call again and the jobs would be made twice."""
    call = asyncio.ensure_future(v1_waiting.user.post("/v1/chat/completions", json=_chat(stream=stream)))
    try:
        ids = await asyncio.wait_for(_cut_database_once_a_job_exists(db, api_db_url), 10)
        response = await asyncio.wait_for(call, 20)
    finally:
        await _allow_connections(api_db_url, True)
    assert response.status_code == 503, response.text
    error = _error(response)
    assert "nothing was changed" not in error["message"] and "the job(s) go on" in error["message"]
    assert ids[0] in error["message"] and "Idempotency-Key" not in error["message"]  # none was sent
    assert response.headers["x-should-retry"] == "false" and response.headers["x-result-id"] == ids[0]


async def test_ignored_fields_are_kept_only_when_storable(v1: V1) -> None:
    # Fields accepted and not used are in the Idempotency-Key's fingerprint: a lone surrogate there
    # made that a 500.
    response = await v1.user.post(
        "/v1/chat/completions",
        content=json.dumps(_chat(safety_identifier="\ud800")).encode(),
        headers={"content-type": "application/json", "Idempotency-Key": "k1"},
    )
    assert response.status_code == 400, response.text
    assert _error(response)["param"] == "safety_identifier"


async def test_v1_names_the_field_over_a_limit_and_refuses_what_it_cannot_honour(v1: V1) -> None:
    over = await v1.user.post("/v1/chat/completions", json=_chat(max_completion_tokens=10**6))
    assert over.status_code == 400 and _error(over)["param"] == "max_completion_tokens"
    assert "max_completion_tokens must be at most" in _error(over)["message"]
    # logprobs: 0 asks completions for the sampled tokens' logprobs (0 == False fooled the no-op check).
    zero = await v1.user.post("/v1/completions", json={"model": FAST_MODEL, "prompt": "Hi", "logprobs": 0})
    assert zero.status_code == 400 and _error(zero)["param"] == "logprobs"
    off = await v1.user.post("/v1/chat/completions", json=_chat(logprobs=False))
    assert off.status_code == 504  # accepted (no worker here: the wait ends)


async def test_a_model_not_ready_is_named_as_the_param_with_a_code(v1: V1) -> None:
    response = await v1.user.post("/v1/chat/completions", json=_chat(model=UNLOADED_MODEL))
    assert response.status_code == 409
    assert _error(response)["param"] == "model" and _error(response)["code"] == "model_not_ready"


async def test_ignore_eos_reaches_the_job(v1: V1, db: psycopg.AsyncConnection[Any]) -> None:
    response = await v1.user.post(
        "/v1/completions", json={"model": FAST_MODEL, "prompt": "Hi", "ignore_eos": True}
    )
    assert response.status_code == 504
    params = (await (await db.execute("SELECT params FROM result")).fetchone())[0]  # type: ignore[index]
    assert params["ignore_eos"] is True
