"""`GET /results/export?by=finished_at`: the window and the order on the jobs' ends, so that windows
exported one after another hold each job once as soon as it ended (by creation, a job joins a window
already exported when it ends after the export). Real Postgres, the app in process; the outcomes are
written here as the worker writes them."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import FAST_MODEL, EnqueueRecorder, bearer, make_api_app, make_key, serve_in_process

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def user(
    db: psycopg.AsyncConnection[Any], triton: object, enqueued: EnqueueRecorder
) -> AsyncIterator[httpx.AsyncClient]:
    app = make_api_app(triton.http_url, enqueued, EXPORT_PAGE_SIZE=2)  # type: ignore[attr-defined]
    async with serve_in_process(app) as http:
        key = await make_key(http, f"export-{uuid.uuid4().hex[:8]}")
        async with httpx.AsyncClient(
            transport=http._transport, base_url="http://api.test", headers=bearer(key)
        ) as client:
            yield client


async def _export(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    response = await client.get("/results/export", params=params)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


async def test_an_export_by_finished_at_windows_and_orders_jobs_by_their_end(
    user: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    context_id = (await user.post("/contexts/", json={"content": "hello"})).json()["id"]
    ids = []
    for _ in range(5):
        sent = await user.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4})
        ids.append(sent.json()["result_id"])
    # Created one minute apart in order; they end in another order, minutes to hours later.
    ends_after_min = [50, 3, 30, 20, 10]
    for i, (rid, end) in enumerate(zip(ids, ends_after_min, strict=True)):
        await db.execute(
            "UPDATE result SET status = 'completed', output = 'x', created_at = %s, finished_at = %s WHERE id = %s",
            (T0 + timedelta(minutes=i), T0 + timedelta(minutes=end), rid),
        )
    by_end = sorted(ids, key=lambda rid: ends_after_min[ids.index(rid)])
    frm, to = T0.isoformat(), (T0 + timedelta(hours=1)).isoformat()

    everything = await _export(user, **{"from": frm, "to": to, "by": "finished_at"})  # pages of 2
    assert [line["id"] for line in everything] == by_end
    assert [line["finished_at"] for line in everything] == sorted(line["finished_at"] for line in everything)

    # Consecutive windows on the end: each job once, in the window of its end.
    cuts = [T0 + timedelta(minutes=m) for m in (0, 4, 15, 25, 60)]
    windows = [
        await _export(user, **{"from": a.isoformat(), "to": b.isoformat(), "by": "finished_at"})
        for a, b in itertools.pairwise(cuts)
    ]
    assert [[line["id"] for line in window] for window in windows] == [
        [ids[1]],
        [ids[4]],
        [ids[3]],
        [ids[2], ids[0]],
    ]
    # By creation (the default) the same window holds the first four created, whenever they ended.
    created_first = await _export(user, **{"from": frm, "to": (T0 + timedelta(minutes=4)).isoformat()})
    assert [line["id"] for line in created_first] == ids[:4]


async def test_an_export_by_an_unknown_time_is_refused_naming_the_choices(user: httpx.AsyncClient) -> None:
    response = await user.get("/results/export", params={"by": "started_at"})
    assert response.status_code == 422
    assert "created_at" in response.text and "finished_at" in response.text


async def test_an_export_line_stays_one_line_for_every_reader(
    user: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    # JSON allows U+2028, U+2029 and NEL raw in a string; str.splitlines() (httpx's iter_lines) cuts there.
    content = "one\u2028two\u2029three\x85four"
    context_id = (await user.post("/contexts/", json={"content": content})).json()["id"]
    await user.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4})
    await db.execute("UPDATE result SET status = 'completed', output = %s, finished_at = now()", (content,))
    response = await user.get("/results/export")
    lines = response.text.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["prompt"] == content == json.loads(lines[0])["response"]


async def test_an_export_status_refusal_lists_the_final_states_only(user: httpx.AsyncClient) -> None:
    for status in ("pending", "bogus"):
        response = await user.get("/results/export", params={"status": status})
        assert response.status_code == 422, response.text
        message = response.json()["error"]
        assert "completed" in message and "cancelled" in message and "'pending'" not in message, message
