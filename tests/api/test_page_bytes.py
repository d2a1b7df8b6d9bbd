"""Listing and export pages are bounded in bytes as well as in rows (PAGE_MAX_BYTES): rows of
hundreds of KB each made one request build pages of hundreds of MB in the API's memory. Real
Postgres, the app in process (no worker: the outcomes are written here as the worker writes them)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from app.services import export as export_service
from tests.conftest import FAST_MODEL, EnqueueRecorder, bearer, make_api_app, make_key, serve_in_process

pytestmark = pytest.mark.anyio

MAX_BYTES = 64 * 1024
ROW_BYTES = 30_000  # three rows fit under the bound before the fourth starts past it


@pytest.fixture
async def user(
    db: psycopg.AsyncConnection[Any], triton: object, enqueued: EnqueueRecorder
) -> AsyncIterator[httpx.AsyncClient]:
    app = make_api_app(
        triton.http_url,  # type: ignore[attr-defined]
        enqueued,
        PAGE_MAX_BYTES=MAX_BYTES,
        MAX_CONTENT_BYTES=40_000,
        EXPORT_PAGE_SIZE=500,
    )
    async with serve_in_process(app) as http:
        key = await make_key(http, f"bytes-{uuid.uuid4().hex[:8]}")
        async with httpx.AsyncClient(
            transport=http._transport, base_url="http://api.test", headers=bearer(key)
        ) as client:
            yield client


async def _all_pages(client: httpx.AsyncClient, path: str) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(path, params=params)).json()
        pages.append(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


async def test_a_listing_page_ends_at_its_byte_bound_and_the_pages_hold_every_row_once(
    user: httpx.AsyncClient, db: psycopg.AsyncConnection[Any]
) -> None:
    contexts = []
    for i in range(10):
        created = await user.post("/contexts/", json={"content": f"{i:02d}" + "x" * (ROW_BYTES - 2)})
        contexts.append(created.json()["id"])
    pages = await _all_pages(user, "/contexts/")
    assert [len(page) for page in pages] == [3, 3, 3, 1]
    assert [item["id"] for page in pages for item in page] == contexts[::-1]

    results = []
    for context_id in contexts:
        sent = await user.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4})
        results.append(sent.json()["result_id"])
    await db.execute(
        "UPDATE result SET status = 'completed', output = repeat('y', %s), finished_at = now() WHERE id = ANY(%s)",
        (ROW_BYTES, results),
    )
    pages = await _all_pages(user, "/results/")
    assert [len(page) for page in pages] == [3, 3, 3, 1]
    assert [item["id"] for page in pages for item in page] == results[::-1]
    # A row larger than the bound still comes, alone on its page.
    await db.execute("UPDATE result SET output = repeat('z', %s) WHERE id = %s", (2 * MAX_BYTES, results[-1]))
    first = (await user.get("/results/", params={"limit": 500})).json()
    assert [item["id"] for item in first["items"]] == [results[-1]] and first["next_cursor"]
    # Within the byte bound, `limit` bounds the page as before.
    two = (await user.get("/contexts/", params={"limit": 2})).json()
    assert [item["id"] for item in two["items"]] == contexts[:-3:-1] and two["next_cursor"]


async def test_an_export_reads_pages_bounded_in_bytes_and_exports_every_job(
    user: httpx.AsyncClient, db: psycopg.AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    results = []
    for i in range(8):
        context_id = (await user.post("/contexts/", json={"content": f"{i}" + "x" * 9_999})).json()["id"]
        sent = await user.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4})
        results.append(sent.json()["result_id"])
    await db.execute(
        "UPDATE result SET status = 'completed', output = repeat('y', %s), finished_at = now() WHERE id = ANY(%s)",
        (ROW_BYTES - 10_000, results),
    )
    page_rows: list[int] = []
    read_page = export_service.repo.export_page

    async def counted(*args: Any, **kwargs: Any) -> Any:
        rows, more = await read_page(*args, **kwargs)
        page_rows.append(len(rows))
        return rows, more

    monkeypatch.setattr(export_service.repo, "export_page", counted)
    response = await user.get("/results/export")
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["id"] for line in lines] == results  # oldest first, each once
    assert page_rows == [3, 3, 2]
