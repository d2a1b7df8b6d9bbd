"""Contexts API against the real database (rolled back per test)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest

pytestmark = pytest.mark.anyio


async def test_create_and_get_context(client: httpx.AsyncClient) -> None:
    created = await client.post("/contexts/", json={"content": "Tell me about Triton."})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["content"] == "Tell me about Triton."
    uuid.UUID(body["id"])
    fetched = await client.get(f"/contexts/{body['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == body


async def test_unknown_context_is_404(client: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    response = await client.get(f"/contexts/{missing}")
    assert response.status_code == 404
    assert response.json()["error"] == f"context {missing} not found"


async def test_malformed_id_is_422_naming_the_field(client: httpx.AsyncClient) -> None:
    response = await client.get("/contexts/not-a-uuid")
    assert response.status_code == 422
    assert "path.context_id" in response.json()["error"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "body.content"),
        ({"content": ""}, "body.content"),
        ({"content": "   "}, "body.content"),
        ({"content": 42}, "body.content"),
        ({"content": "x", "extra": 1}, "body.extra"),
    ],
)
async def test_invalid_body_is_422_with_field(
    client: httpx.AsyncClient, payload: dict[str, object], field: str
) -> None:
    response = await client.post("/contexts/", json=payload)
    assert response.status_code == 422
    body = response.json()
    assert field in [p["field"] for p in body["detail"]], body
    assert body["error"].startswith("invalid request:")


async def test_not_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/contexts/", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["error"]


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"]
)
async def test_a_body_that_is_not_labelled_json_is_415_and_stores_nothing(
    client: httpx.AsyncClient, db: psycopg.AsyncConnection[Any], content_type: str
) -> None:
    response = await client.post(
        "/contexts/", content=b'{"content": "hi"}', headers={"content-type": content_type}
    )
    assert response.status_code == 415
    assert f"sent with Content-Type: application/json (not '{content_type}')" in response.json()["error"]
    assert await (await db.execute("SELECT count(*) FROM context")).fetchone() == (0,)


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.llmq+json", None]
)
async def test_json_is_taken_under_any_json_label_or_none(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post("/contexts/", content=b'{"content": "hi"}', headers=headers)
    assert response.status_code == 201, response.text


async def test_oversized_content_is_413_and_stores_nothing(client: httpx.AsyncClient) -> None:
    # The test app's MAX_CONTENT_BYTES is 4096; multi-byte characters count as bytes.
    response = await client.post("/contexts/", json={"content": "é" * 2049})
    assert response.status_code == 413
    assert response.json()["error"] == "content is 4098 bytes; the limit is 4096 bytes"
    listing = await client.get("/contexts/")
    assert listing.json()["items"] == []


async def test_huge_body_is_refused_before_reading(client: httpx.AsyncClient) -> None:
    response = await client.post("/contexts/", content=b"x" * (4096 * 6 + 64 * 1024 + 1))
    assert response.status_code == 413
    assert "limit" in response.json()["error"]


async def test_list_contexts_paginates_newest_first(client: httpx.AsyncClient) -> None:
    ids = []
    for i in range(5):
        response = await client.post("/contexts/", json={"content": f"prompt {i}"})
        ids.append(response.json()["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, object] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/contexts/", params=params)).json()
        pages += 1
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids))


async def test_bad_cursor_and_limit_are_422(client: httpx.AsyncClient) -> None:
    bad_cursor = await client.get("/contexts/", params={"cursor": "garbage!!"})
    assert bad_cursor.status_code == 422
    assert bad_cursor.json()["detail"] == {"field": "cursor"}
    bad_limit = await client.get("/contexts/", params={"limit": 0})
    assert bad_limit.status_code == 422
    assert "query.limit" in bad_limit.json()["error"]
