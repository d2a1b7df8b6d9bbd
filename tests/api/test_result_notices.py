"""Completion notices that carry the final row: a long poll answers with it, without reading
Postgres again; a notice without a (readable) row makes it read. Real Redis, real database."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis

from app.config import get_settings
from app.notify import (
    MAX_NOTICE_ROW_BYTES,
    PENDING,
    RECENT_ROWS,
    ResultWaiter,
    done_channel,
    notice,
    parse_notice,
)
from app.schemas import ResultOut
from app.services import results as results_service
from app.streams import TokenStreamReader
from bench.faults.services import OwnRedis
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


async def _pending_result(client: httpx.AsyncClient) -> dict[str, object]:
    context = await client.post("/contexts/", json={"content": "notice me"})
    sent = await client.post(f"/models/send/{FAST_MODEL}/{context.json()['id']}", json={"max_tokens": 4})
    assert sent.status_code == 202, sent.text
    current = await client.get(f"/results/{sent.json()['result_id']}")
    assert current.json()["status"] == "pending"  # nothing consumes the test's enqueues
    return dict(current.json())


async def _long_poll_woken_by(
    client: httpx.AsyncClient,
    result_id: str,
    message: bytes,
    poll: asyncio.Task[httpx.Response] | None = None,
) -> httpx.Response:
    settings = get_settings()
    publisher = aioredis.from_url(settings.REDIS_URL)
    try:
        if poll is None:
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
    client: httpx.AsyncClient,
    db: psycopg.AsyncConnection[Any],
    row: bytes | str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pending = await _pending_result(client)
    if row == "other":  # a well-formed row, but of another result
        other = {**pending, "id": str(uuid.uuid4()), "status": "completed", "output": "not yours"}
        row = ResultOut.model_validate(other).model_dump_json().encode()
    assert not isinstance(row, str)
    message = str(pending["id"]).encode() + (b"\n" + row if row else b"")
    poll = asyncio.create_task(client.get(f"/results/{pending['id']}", params={"wait": 10}, timeout=20))
    await asyncio.sleep(0.5)  # waiting on the notice by now
    await db.execute(
        "UPDATE result SET status = 'completed', output = 'from postgres', finished_at = now() WHERE id = %s",
        (pending["id"],),
    )
    with caplog.at_level(logging.WARNING, logger="app.services.results"):
        answer = await _long_poll_woken_by(client, str(pending["id"]), message, poll)
    assert answer.status_code == 200
    assert answer.json()["status"] == "completed"
    assert answer.json()["output"] == "from postgres"  # what Postgres says, not the notice
    assert ("unreadable completion notice" in caplog.text) == (row is not None)


def test_notice_format() -> None:
    rid = uuid.uuid4()
    assert parse_notice(notice(rid)) == (str(rid), None)
    assert parse_notice(notice(rid, b'{"a": 1}')) == (str(rid), b'{"a": 1}')
    # Too large to fan out to every API process: the id only, the waiters read the database.
    assert parse_notice(notice(rid, b"x" * (MAX_NOTICE_ROW_BYTES + 1))) == (str(rid), None)
    assert parse_notice(str(rid).encode() + b"\n") == (str(rid), None)


def _final_of(pending: dict[str, object], output: str) -> tuple[dict[str, object], bytes]:
    final = {**pending, "status": "completed", "output": output, "finish_reason": "stop"}
    final |= {"completion_tokens": 3, "prompt_tokens": 2, "finished_at": pending["updated_at"]}
    return final, notice(
        uuid.UUID(str(pending["id"])), ResultOut.model_validate(final).model_dump_json().encode()
    )


async def test_polls_of_a_job_created_here_are_answered_from_the_notices_not_postgres(
    api_app: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = api_app.user
    pending = await _pending_result(client)  # sent through this process: it knows the job is pending
    reads: list[uuid.UUID] = []
    real_read = results_service.read

    async def counted_read(db: object, principal: object, result_id: uuid.UUID) -> ResultOut:
        reads.append(result_id)
        return await real_read(db, principal, result_id)  # type: ignore[arg-type]

    monkeypatch.setattr(results_service, "read", counted_read)
    # The database still says pending: the answers below can only come from the notice.
    final, message = _final_of(pending, "from the notice")
    answer = await _long_poll_woken_by(client, str(pending["id"]), message)
    assert answer.status_code == 200 and answer.json() == final
    again = await client.get(f"/results/{pending['id']}")  # a plain GET of a finished job
    assert again.status_code == 200 and again.json() == final
    assert reads == []
    # Another tenant's key: as unknown as a missing id, whatever this process remembers.
    stranger = await api_app.client_of(f"stranger-{uuid.uuid4().hex[:8]}")
    for params in ({}, {"wait": 0.1}):
        refused = await stranger.get(f"/results/{pending['id']}", params=params)
        assert refused.status_code == 404, refused.text
    assert api_app.admin is not None
    seen_by_admin = await api_app.admin.get(f"/results/{pending['id']}")
    assert seen_by_admin.json() == final


async def test_a_lost_notice_costs_a_job_created_here_at_most_the_trusted_wait(
    api_app: InProcessApi, db: psycopg.AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results_service, "TRUST_PENDING_S", 0.3)
    client = api_app.user
    pending = await _pending_result(client)
    # Finished in Postgres without any notice (as if Redis dropped it).
    await db.execute(
        "UPDATE result SET status = 'completed', output = 'no notice', finished_at = now() WHERE id = %s",
        (pending["id"],),
    )
    answer = await client.get(f"/results/{pending['id']}", params={"wait": 20}, timeout=30)
    assert answer.json()["status"] == "completed" and answer.json()["output"] == "no notice"


async def test_the_waiter_remembers_within_bounds_and_forgets_jobs_when_the_subscription_drops() -> None:
    waiter = ResultWaiter(get_settings().REDIS_URL, "unused")
    waiter._subscribed = asyncio.Event()
    mine = uuid.uuid4()
    waiter.created(mine, "t1")
    assert waiter.known(mine, "t1") is None  # not subscribed: notices may be missed
    waiter._subscribed.set()
    waiter.created(mine, "t1")
    assert waiter.known(mine, "t1") == PENDING and waiter.known(mine, None) == PENDING
    assert waiter.known(mine, "t2") is None
    row = b'{"id":"%s","tenant":"t1","status":"completed"}' % str(mine).encode()
    waiter._remember(str(mine), row)
    assert waiter.known(mine, "t1") == row and waiter.known(mine, None) == row
    assert waiter.known(mine, "t2") is None
    # The sweeper's notice (no row) replaces what was remembered: Postgres answers.
    waiter._remember(str(mine), None)
    assert waiter.known(mine, "t1") is None
    ids = [uuid.uuid4() for _ in range(RECENT_ROWS + 10)]
    for rid in ids:
        waiter._remember(str(rid), b'{"id":"%s","tenant":"t1","status":"failed"}' % str(rid).encode())
    assert waiter.known(ids[0], "t1") is None and waiter.known(ids[-1], "t1") is not None
    assert len(waiter._recent) == RECENT_ROWS


async def test_a_notice_that_comes_while_the_long_poll_starts_watching_is_not_missed(
    api_app: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = api_app.user
    pending = await _pending_result(client)
    final, message = _final_of(pending, "arrived while the watch began")
    waiter: ResultWaiter = api_app.app.state.runtime.waiter
    start_watching = waiter._ensure_listening

    async def notice_meanwhile() -> None:
        await start_watching()
        key, row = parse_notice(message)  # as the subscription would hand it over, before the watch exists
        waiter._remember(key, row)
        waiter._wake(key, row)

    monkeypatch.setattr(waiter, "_ensure_listening", notice_meanwhile)
    monkeypatch.setattr(results_service, "TRUST_PENDING_S", 30.0)
    # Missed, the poll would wait out its 3 s and answer what Postgres says: pending.
    answer = await client.get(f"/results/{pending['id']}", params={"wait": 3}, timeout=10)
    assert answer.json() == final


async def test_once_subscribed_a_watch_and_a_follow_begin_without_a_trip_through_the_event_loop() -> None:
    # A long poll or a stream that yields to the loop here waits behind every request of a burst.
    settings = get_settings()
    waiter = ResultWaiter(settings.REDIS_URL, f"test-{uuid.uuid4().hex}")
    streams = TokenStreamReader(settings)
    try:
        await waiter.listening()
        async with streams.follow(uuid.uuid4()):  # the first one subscribes
            pass
        others_ran: list[bool] = []
        asyncio.get_running_loop().call_soon(others_ran.append, True)
        async with waiter.watch(uuid.uuid4()), streams.follow(uuid.uuid4()):
            assert not others_ran
        await asyncio.sleep(0)
        assert others_ran
    finally:
        await waiter.close()
        await streams.close()


async def test_a_long_poll_waits_its_time_through_a_redis_outage(
    db: psycopg.AsyncConnection[Any], triton: Any, logs_dir: Path
) -> None:
    """Losing the notices' subscription wakes the waiters to read Postgres; a job still pending
    then keeps them waiting (the row read each second), rather than answering `pending` early."""
    redis = OwnRedis(logs_dir / "long-poll-outage")
    redis.start()
    app = make_api_app(triton.http_url, EnqueueRecorder(), REDIS_URL=redis.url)
    try:
        async with serve_in_process(app) as http:
            http.headers.update(bearer(ADMIN_KEY))
            pending = await _pending_result(http)
            loop = asyncio.get_running_loop()
            started = loop.time()
            poll = asyncio.create_task(http.get(f"/results/{pending['id']}", params={"wait": 4}, timeout=20))
            await asyncio.sleep(1)
            redis.kill9()
            await db.execute(
                "UPDATE result SET status = 'completed', output = 'seen in the row', finished_at = now() "
                "WHERE id = %s AND pg_sleep(1.5) IS NOT NULL",
                (pending["id"],),
            )
            answer = await poll
            waited = loop.time() - started
    finally:
        redis.stop()
    assert answer.json()["status"] == "completed" and answer.json()["output"] == "seen in the row"
    assert waited < 4, "answered at the end of its wait, not when the row said it had ended"
