"""Completion notices that carry the final row: a long poll answers with it, without reading
Postgres again; a notice without a (readable) row makes it read. Real Redis, real database."""

from __future__ import annotations

import asyncio
import logging
import uuid

import httpx
import pytest
import redis.asyncio as aioredis

from app.config import get_settings
from app.notify import MAX_NOTICE_ROW_BYTES, done_channel, notice, parse_notice
from app.schemas import ResultOut
from tests.conftest import FAST_MODEL

pytestmark = pytest.mark.anyio


async def _pending_result(client: httpx.AsyncClient) -> dict[str, object]:
    context = await client.post("/contexts/", json={"content": "notice me"})
    sent = await client.post(f"/models/send/{FAST_MODEL}/{context.json()['id']}", json={"max_tokens": 4})
    assert sent.status_code == 202, sent.text
    current = await client.get(f"/results/{sent.json()['result_id']}")
    assert current.json()["status"] == "pending"  # nothing consumes the test's enqueues
    return dict(current.json())


async def _long_poll_woken_by(client: httpx.AsyncClient, result_id: str, message: bytes) -> httpx.Response:
    settings = get_settings()
    publisher = aioredis.from_url(settings.REDIS_URL)
    try:
        poll = asyncio.create_task(client.get(f"/results/{result_id}", params={"wait": 10}, timeout=20))
        # Publish until the waiter has subscribed and registered (a notice before that is lost).
        for _ in range(200):
            await asyncio.sleep(0.02)
            if poll.done():
                break
            await publisher.publish(done_channel(settings), message)
        return await asyncio.wait_for(poll, 5)
    finally:
        await publisher.aclose()


async def test_the_long_poll_answers_with_the_row_the_notice_carries(client: httpx.AsyncClient) -> None:
    pending = await _pending_result(client)
    # The database still says pending: an answer with this row can only come from the notice.
    final = {**pending, "status": "completed", "output": "from the notice", "finish_reason": "stop"}
    final |= {"completion_tokens": 3, "prompt_tokens": 2, "finished_at": pending["updated_at"]}
    # As the worker renders it (worker/job_store.py).
    rendered = ResultOut.model_validate(final).model_dump_json().encode()
    message = notice(uuid.UUID(str(pending["id"])), rendered)
    answer = await _long_poll_woken_by(client, str(pending["id"]), message)
    assert answer.status_code == 200
    assert answer.json() == final


@pytest.mark.parametrize(
    "row", [None, b"{not json", b'{"id": "x"}', "other"], ids=["id-only", "garbage", "invalid", "other-id"]
)
async def test_a_notice_without_a_readable_row_makes_the_poll_read_the_database(
    client: httpx.AsyncClient, row: bytes | str | None, caplog: pytest.LogCaptureFixture
) -> None:
    pending = await _pending_result(client)
    if row == "other":  # a well-formed row, but of another result
        other = {**pending, "id": str(uuid.uuid4()), "status": "completed", "output": "not yours"}
        row = ResultOut.model_validate(other).model_dump_json().encode()
    assert not isinstance(row, str)
    message = str(pending["id"]).encode() + (b"\n" + row if row else b"")
    with caplog.at_level(logging.WARNING, logger="app.services.results"):
        answer = await _long_poll_woken_by(client, str(pending["id"]), message)
    assert answer.status_code == 200
    assert answer.json() == pending  # woken at once, and what Postgres says
    assert ("unreadable completion notice" in caplog.text) == (row is not None)


def test_notice_format() -> None:
    rid = uuid.uuid4()
    assert parse_notice(notice(rid)) == (str(rid), None)
    assert parse_notice(notice(rid, b'{"a": 1}')) == (str(rid), b'{"a": 1}')
    # Too large to fan out to every API process: the id only, the waiters read the database.
    assert parse_notice(notice(rid, b"x" * (MAX_NOTICE_ROW_BYTES + 1))) == (str(rid), None)
    assert parse_notice(str(rid).encode() + b"\n") == (str(rid), None)
