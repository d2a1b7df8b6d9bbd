"""Submitting jobs and listing results, against the real database and the real local Triton
(for model validation); the enqueue is recorded here, the worker is exercised in tests/e2e."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

import httpx
import psycopg
import pytest

from app.repositories.results import NewResult
from tests.conftest import FAST_MODEL, SLOW_MODEL, UNLOADED_MODEL, EnqueueRecorder, InProcessApi

pytestmark = pytest.mark.anyio


async def _context(client: httpx.AsyncClient, content: str = "Hello there") -> str:
    response = await client.post("/contexts/", json={"content": content})
    assert response.status_code == 201
    return str(response.json()["id"])


async def test_send_creates_pending_result_and_enqueues_its_id(
    client: httpx.AsyncClient, enqueued: EnqueueRecorder
) -> None:
    context_id = await _context(client)
    response = await client.post(
        f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 12, "temperature": 0, "seed": 3}
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "pending"
    assert body["model"] == FAST_MODEL
    assert response.headers["location"] == f"/results/{body['result_id']}"
    assert enqueued.calls == [uuid.UUID(body["result_id"])]

    result = (await client.get(response.headers["location"])).json()
    assert result["status"] == "pending"
    assert result["started_at"] is None
    assert result["attempts"] == 0
    assert result["params"] == {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 3}


async def test_send_without_body_uses_defaults(client: httpx.AsyncClient) -> None:
    context_id = await _context(client)
    response = await client.post(f"/models/send/{FAST_MODEL}/{context_id}")
    assert response.status_code == 202, response.text
    result = (await client.get(f"/results/{response.json()['result_id']}")).json()
    assert result["params"]["max_tokens"] == 256
    assert "seed" not in result["params"]


async def test_send_to_unknown_context_is_404(client: httpx.AsyncClient, enqueued: EnqueueRecorder) -> None:
    missing = uuid.uuid4()
    response = await client.post(f"/models/send/{FAST_MODEL}/{missing}")
    assert response.status_code == 404
    assert response.json()["error"] == f"context {missing} not found"
    assert enqueued.calls == []


async def test_send_to_unknown_model_is_404_naming_models(
    client: httpx.AsyncClient, enqueued: EnqueueRecorder
) -> None:
    context_id = await _context(client)
    response = await client.post(f"/models/send/no-such-model/{context_id}")
    assert response.status_code == 404
    body = response.json()
    assert "model 'no-such-model' is not served by Triton" in body["error"]
    assert FAST_MODEL in body["error"] and SLOW_MODEL in body["error"]
    assert enqueued.calls == []
    assert (await client.get("/results/")).json()["items"] == []


async def test_send_to_unloaded_model_is_409(client: httpx.AsyncClient, enqueued: EnqueueRecorder) -> None:
    context_id = await _context(client)
    response = await client.post(f"/models/send/{UNLOADED_MODEL}/{context_id}")
    assert response.status_code == 409
    body = response.json()
    assert f"model '{UNLOADED_MODEL}' is not ready" in body["error"]
    assert f"ready models: {FAST_MODEL}, {SLOW_MODEL}" in body["error"]
    assert enqueued.calls == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": 0}, "body.max_tokens"),
        ({"max_tokens": "many"}, "body.max_tokens"),
        ({"temperature": -1}, "body.temperature"),
        ({"temperature": 5}, "body.temperature"),
        ({"top_p": 0}, "body.top_p"),
        ({"stop": [""]}, "body.stop.0"),
        ({"seed": -4}, "body.seed"),
        ({"best_of": 3}, "body.best_of"),
        # Strict types: no string for a number, no boolean for a seed or a count.
        ({"max_tokens": "5"}, "body.max_tokens"),
        ({"seed": True}, "body.seed"),
        ({"temperature": "0.5"}, "body.temperature"),
        ({"stream": "yes"}, "body.stream"),
        ({"max_tokens": 5.0}, "body.max_tokens"),
    ],
)
async def test_send_with_invalid_params_is_422(
    client: httpx.AsyncClient, enqueued: EnqueueRecorder, params: dict[str, object], field: str
) -> None:
    context_id = await _context(client)
    response = await client.post(f"/models/send/{FAST_MODEL}/{context_id}", json=params)
    assert response.status_code == 422
    assert field in [p["field"] for p in response.json()["detail"]]
    assert enqueued.calls == []


async def test_a_body_json_cannot_read_is_422_saying_why(
    client: httpx.AsyncClient, enqueued: EnqueueRecorder
) -> None:
    context_id = await _context(client)
    for body, problem in [
        (b'{"stop": "\xff\xfe"}', "the body is not valid UTF-8"),
        (b"[" * 20_000 + b"]" * 20_000, "the JSON body is nested too deeply"),
        (b'{"temperature": NaN}', "body.temperature: Input should be a finite number"),
        (b'{"temperature": Infinity}', "body.temperature: Input should be a finite number"),
    ]:
        response = await client.post(
            f"/models/send/{FAST_MODEL}/{context_id}",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422, response.text
        assert problem in response.json()["error"] and response.json()["detail"][0]["field"].startswith(
            "body"
        )
    assert enqueued.calls == []


async def test_max_tokens_above_configured_limit_is_422(client: httpx.AsyncClient) -> None:
    context_id = await _context(client)
    response = await client.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 100_000})
    assert response.status_code == 422
    assert response.json()["error"] == "max_tokens must be at most 8192, got 100000"


async def test_an_integer_where_a_number_goes_is_a_number(client: httpx.AsyncClient) -> None:
    context_id = await _context(client)
    response = await client.post(
        f"/models/send/{FAST_MODEL}/{context_id}", json={"temperature": 1, "top_p": 1}
    )
    assert response.status_code == 202, response.text


async def test_stop_accepts_a_single_string(client: httpx.AsyncClient) -> None:
    context_id = await _context(client)
    response = await client.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"stop": "\n"})
    assert response.status_code == 202
    result = (await client.get(f"/results/{response.json()['result_id']}")).json()
    assert result["params"]["stop"] == ["\n"]


async def test_unknown_result_is_404(client: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    response = await client.get(f"/results/{missing}")
    assert response.status_code == 404
    assert response.json() == {"error": f"result {missing} not found", "detail": None}


async def test_results_filters_and_pagination(
    client: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    ctx_a = await _context(client, "first")
    ctx_b = await _context(client, "second")
    ids = []
    for ctx, model in [(ctx_a, FAST_MODEL), (ctx_a, SLOW_MODEL), (ctx_b, FAST_MODEL), (ctx_b, FAST_MODEL)]:
        response = await client.post(f"/models/send/{model}/{ctx}", json={"max_tokens": 4})
        ids.append(response.json()["result_id"])
    await db.execute("UPDATE result SET status = 'completed' WHERE id = %s", (ids[0],))
    await db.execute("UPDATE result SET status = 'failed', error = 'x' WHERE id = %s", (ids[3],))

    async def listing(**params: object) -> list[str]:
        collected: list[str] = []
        cursor = None
        while True:
            query = {**params, "limit": 1, **({"cursor": cursor} if cursor else {})}
            response = await client.get("/results/", params=query)
            assert response.status_code == 200, response.text
            page = response.json()
            collected += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return collected

    assert await listing() == list(reversed(ids))
    assert await listing(status="completed") == [ids[0]]
    assert await listing(status="failed") == [ids[3]]
    assert await listing(status="pending") == [ids[2], ids[1]]
    assert await listing(status=["completed", "failed"]) == [ids[3], ids[0]]  # repeated: any of them
    assert await listing(model=SLOW_MODEL) == [ids[1]]
    assert await listing(context_id=ctx_b) == [ids[3], ids[2]]
    assert await listing(context_id=ctx_b, model=FAST_MODEL, status="pending") == [ids[2]]

    bad_status = await client.get("/results/", params={"status": "done"})
    assert bad_status.status_code == 422
    assert "query.status" in bad_status.json()["error"]


async def test_results_filter_with_a_nul_character_is_422(client: httpx.AsyncClient) -> None:
    # Found by the schemathesis fuzz test: Postgres text cannot hold NUL, and the query failed with 500.
    response = await client.get("/results/", params={"model": "\x00"})
    assert response.status_code == 422
    assert "query.model" in [p["field"] for p in response.json()["detail"]]


async def test_chat_sends_the_context_through_the_models_template(
    db: psycopg.AsyncConnection[Any], triton: Any, tmp_path: Any
) -> None:
    from tests.conftest import make_api_app, make_key, serve_in_process

    (tmp_path / FAST_MODEL).mkdir()
    (tmp_path / FAST_MODEL / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    app = make_api_app(triton.http_url, None, CHAT_TEMPLATES_DIRS=str(tmp_path))
    async with serve_in_process(app) as client:
        client.headers["authorization"] = f"Bearer {await make_key(client, 'chatty')}"
        context_id = await _context(client, "Hi there")
        sent = await client.post(
            f"/models/send/{FAST_MODEL}/{context_id}", json={"chat": True, "max_tokens": 4}
        )
        assert sent.status_code == 202, sent.text
        raw = await client.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4})
        no_template = await client.post(f"/models/send/{SLOW_MODEL}/{context_id}", json={"chat": True})
    assert no_template.status_code == 400
    assert f"model '{SLOW_MODEL}' has no chat template" in no_template.json()["error"]
    rows = await (
        await db.execute(
            "SELECT id::text, prompt FROM result WHERE id = ANY(%s::uuid[])",
            ([sent.json()["result_id"], raw.json()["result_id"]],),
        )
    ).fetchall()
    prompts = dict(rows)
    assert prompts[sent.json()["result_id"]] == "<user>Hi there</user><assistant>"
    assert prompts[raw.json()["result_id"]] is None  # the worker sends the context as is


async def test_concurrent_submits_share_statements_and_each_gets_its_own_answer(
    api_app: InProcessApi, db: psycopg.AsyncConnection[Any], enqueued: EnqueueRecorder
) -> None:
    """A burst of submits is inserted a batch per statement (the rows of one statement share its
    transaction id, `xmin`); another tenant's context in the burst is a 404 for that one only."""
    own = await _context(api_app.user)
    async with await api_app.client_of(f"other-{uuid.uuid4().hex[:8]}") as other:
        foreign = await _context(other)
    contexts = [own] * 30 + [foreign] + [own] * 9
    answers = await asyncio.gather(
        *(api_app.user.post(f"/models/send/{FAST_MODEL}/{ctx}", json={"max_tokens": 4}) for ctx in contexts)
    )
    assert [a.status_code for a in answers] == [202] * 30 + [404] + [202] * 9
    assert answers[30].json()["error"] == f"context {foreign} not found"
    ids = [uuid.UUID(a.json()["result_id"]) for a in answers if a.status_code == 202]
    assert len(set(ids)) == 39
    assert sorted(enqueued.calls) == sorted(ids)
    rows = await (
        await db.execute("SELECT id, xmin::text, tenant FROM result WHERE id = ANY(%s)", (ids,))
    ).fetchall()
    assert len(rows) == 39 and {r[2] for r in rows} == {api_app.tenant}
    assert len({r[1] for r in rows}) < 39, "every submit had a transaction of its own"
    assert (await (await db.execute("SELECT count(*) FROM result")).fetchone()) == (39,)


async def test_a_row_postgres_refuses_fails_only_its_own_submit(
    api_app: InProcessApi, db: psycopg.AsyncConnection[Any]
) -> None:
    """One row of a batch that Postgres refuses (a NUL character jsonb cannot hold) fails that
    insert alone: the others of its batch are inserted."""
    context_id = uuid.UUID(await _context(api_app.user))
    inserts = api_app.app.state.runtime.inserts

    def row(params: dict[str, Any]) -> NewResult:
        return NewResult(uuid.uuid4(), api_app.tenant, context_id, FAST_MODEL, params)

    rows = [row({"max_tokens": n}) for n in range(1, 6)]
    rows.insert(2, row({"stop": ["\x00"]}))
    answers = await asyncio.gather(*(inserts(r) for r in rows), return_exceptions=True)
    assert isinstance(answers[2], psycopg.Error)
    assert all(isinstance(a, datetime) for i, a in enumerate(answers) if i != 2), answers
    stored = await (await db.execute("SELECT id FROM result")).fetchall()
    assert {r[0] for r in stored} == {r.id for i, r in enumerate(rows) if i != 2}


async def test_a_submit_stores_its_parameters_and_deadline_as_sent(
    client: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    """What a batch carries to Postgres comes back unchanged: text outside ASCII, numbers that
    are not exact in binary, and the job's own deadline (`timeout_s` after its creation)."""
    context_id = await _context(client)
    stop = ["é", "猫", "🙂", 'quote " and \\ backslash']
    response = await client.post(
        f"/models/send/{FAST_MODEL}/{context_id}",
        json={"max_tokens": 7, "temperature": 0.1, "top_p": 0.3, "stop": stop, "timeout_s": 2.5},
    )
    assert response.status_code == 202, response.text
    row = await (
        await db.execute(
            "SELECT params, extract(epoch FROM deadline_at - created_at) FROM result WHERE id = %s",
            (response.json()["result_id"],),
        )
    ).fetchone()
    assert row is not None
    params, deadline_s = row
    assert params["stop"] == stop
    assert (params["temperature"], params["top_p"]) == (0.1, 0.3)
    assert 2.49 <= float(deadline_s) < 3.5
    plain = await client.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 7})
    no_deadline = await (
        await db.execute("SELECT deadline_at FROM result WHERE id = %s", (plain.json()["result_id"],))
    ).fetchone()
    assert no_deadline == (None,)


async def test_a_timeout_over_the_platforms_deadline_is_refused_with_the_value_sent(
    client: httpx.AsyncClient,
) -> None:
    context_id = await _context(client)
    over = 3600.0001  # JOB_DEADLINE_S is 3600 here: rounded, the value would read as allowed
    response = await client.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"timeout_s": over})
    assert response.status_code == 422
    assert response.json()["error"].endswith(f"got {over!r}")


async def test_a_wait_that_is_not_a_finite_number_is_422_saying_so(client: httpx.AsyncClient) -> None:
    for wait in ("nan", "inf", "-inf"):
        response = await client.get(f"/results/{uuid.uuid4()}", params={"wait": wait})
        assert response.status_code == 422
        assert "finite number" in response.json()["error"], response.text
