"""Live pieces reach a stream's follower through the pieces channel, and the stream itself fills
what a lost message carried. Real Redis and database; the worker's side is played by hand here
(the same commands its StreamWriter sends), so a message can be dropped on purpose."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from app.config import get_settings
from app.notify import done_channel, notice
from app.repositories import results as results_repo
from app.schemas import ResultOut
from app.services import streams as streams_service
from app.sse import KEEPALIVE
from app.streams import (
    DONE_FIELD,
    TEXT_FIELD,
    TokenStreamReader,
    encode_published,
    entry_id,
    pieces_channel,
    stream_key,
)
from tests.conftest import FAST_MODEL, InProcessApi

pytestmark = pytest.mark.anyio


def _events(body: str) -> list[tuple[str, str, str]]:
    """(event, id, data) of each SSE event."""
    found = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            found.append((fields["event"], fields.get("id", ""), fields.get("data", "")))
    return found


async def _streamed_job(client: httpx.AsyncClient, content: str) -> str:
    """A pending job sent with `"stream": true` (no worker runs it: the test plays the worker)."""
    context = await client.post("/contexts/", json={"content": content})
    sent = await client.post(
        f"/models/send/{FAST_MODEL}/{context.json()['id']}", json={"max_tokens": 4, "stream": True}
    )
    assert sent.status_code == 202, sent.text
    return str(sent.json()["result_id"])


async def test_pieces_come_from_the_channel_and_a_lost_message_is_read_from_the_stream(
    client: httpx.AsyncClient,
) -> None:
    settings = get_settings()
    result_id = await _streamed_job(client, "stream me")
    key = stream_key(settings.CELERY_QUEUE, result_id)
    worker = aioredis.from_url(settings.REDIS_URL)

    async def append(seq: int, text: str | None, publish: bool, store: bool = True) -> None:
        fields = {TEXT_FIELD: text.encode()} if text is not None else {DONE_FIELD: b"completed"}
        if store:
            await worker.xadd(key, fields, id=entry_id(seq))  # type: ignore[arg-type]
        if publish:
            piece = [result_id, seq, text] if text is not None else [result_id, seq, None, "completed"]
            await worker.publish(pieces_channel(settings.CELERY_QUEUE), encode_published([piece]))

    async def play() -> None:
        # Wait for the follower's subscription, then play the worker: message 2 is lost (its
        # text only in the stream), and text 3 only on the channel, so each source must be read.
        for _ in range(100):
            if (await worker.pubsub_numsub(pieces_channel(settings.CELERY_QUEUE)))[0][1]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await append(1, "Hello", True)
        await append(2, ",", False)
        await append(3, " world", True, store=False)
        await asyncio.sleep(0.3)  # the follower fills the gap before the end is in the stream
        await append(4, None, True)

    try:
        stream, _ = await asyncio.gather(client.get(f"/results/{result_id}/stream", timeout=20), play())
        events = _events(stream.text)
        tokens = [(e, i, json.loads(d)["text"]) for e, i, d in events if e == "token"]
        assert tokens == [("token", "1", "Hello"), ("token", "2", ","), ("token", "3", " world")]
        assert events[-1][0] == "done" and events[-1][1] == "4"
        # Read again after its end marker: all of it at once, from the stream (which lacks text 3).
        again = _events((await client.get(f"/results/{result_id}/stream", timeout=20)).text)
        assert [json.loads(d)["text"] for e, _, d in again if e == "token"] == ["Hello", ","]
    finally:
        await worker.delete(key)
        await worker.aclose()


async def test_a_job_run_again_restarts_its_stream_and_readers_drop_the_earlier_text(
    client: httpx.AsyncClient,
) -> None:
    from worker.token_streams import StreamWriter  # the worker's side, on this test's loop

    settings = get_settings()
    result_id = uuid.UUID(await _streamed_job(client, "stream me twice"))
    writer = StreamWriter(settings)
    live: list[tuple[str, str, str]] = []

    async def follow_live() -> None:  # connected before the first run's first piece
        async with client.stream("GET", f"/results/{result_id}/stream", timeout=20) as response:
            live.extend(_events((await response.aread()).decode()))

    async def play() -> None:
        await _Worker(str(result_id)).follower_ready()
        first = writer.first_sink(result_id)  # run 1 is cut after "Hello wor"
        first("Hello")
        await asyncio.sleep(0.1)
        first(" wor")
        await asyncio.sleep(0.2)
        second = await writer.open(result_id)  # run 2 generates another text
        for piece in ("Hi", " there", "!"):
            second(piece)
            await asyncio.sleep(0.05)
        second.finish("completed")

    try:
        await asyncio.gather(follow_live(), play())
        read = {
            after: _events(
                (
                    await client.get(
                        f"/results/{result_id}/stream",
                        headers={"Last-Event-ID": str(after)} if after else {},
                        timeout=20,
                    )
                ).text
            )
            for after in (0, 1, 3)
        }
        # A third run after more text: one more marker, found by a run that reads the stream.
        third = await writer.open(result_id)
        assert (third.next_seq, third.restart) == (8, True)
    finally:
        await writer.close()
        cleanup = aioredis.from_url(settings.REDIS_URL)
        await cleanup.delete(stream_key(settings.CELERY_QUEUE, result_id))
        await cleanup.aclose()
    # Events 1-2: run 1's text; 3: the restart; 4-6: run 2's text; 7: the end marker.
    assert [(e, i) for e, i, _ in live] == [
        ("token", "1"), ("token", "2"), ("restart", "3"), ("token", "4"), ("token", "5"), ("token", "6"), ("done", "7"),
    ]  # fmt: skip
    assert "drop the text" in json.loads(live[2][2])["reason"]

    def text(events: list[tuple[str, str, str]]) -> str:
        return "".join(json.loads(d)["text"] for e, _, d in events if e == "token")

    assert text(live[3:]) == "Hi there!"
    # From the start: run 2's text only, no restart to act on; after event 1: the restart first;
    # after the restart: the rest.
    assert [i for _, i, _ in read[0]] == ["4", "5", "6", "7"] and text(read[0]) == "Hi there!"
    assert [e for e, _, _ in read[1]] == ["restart", "token", "token", "token", "done"]
    assert text(read[1]) == "Hi there!" and text(read[3]) == "Hi there!" and read[3][0][1] == "4"


class _Worker:
    """Plays a streamed job's worker: its pieces (stream and channel), its end marker, its notice."""

    def __init__(self, result_id: str) -> None:
        self.settings = get_settings()
        self.result_id = result_id
        self.key = stream_key(self.settings.CELERY_QUEUE, result_id)
        self.redis = aioredis.from_url(self.settings.REDIS_URL)

    async def follower_ready(self) -> None:
        for _ in range(100):
            if (await self.redis.pubsub_numsub(pieces_channel(self.settings.CELERY_QUEUE)))[0][1]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)

    async def piece(self, seq: int, text: str) -> None:
        await self.redis.xadd(self.key, {TEXT_FIELD: text.encode()}, id=entry_id(seq))
        published = encode_published([[self.result_id, seq, text]])
        await self.redis.publish(pieces_channel(self.settings.CELERY_QUEUE), published)

    async def end_marker(self, seq: int) -> None:
        await self.redis.xadd(self.key, {DONE_FIELD: b"completed"}, id=entry_id(seq))
        published = encode_published([[self.result_id, seq, None, "completed"]])
        await self.redis.publish(pieces_channel(self.settings.CELERY_QUEUE), published)

    async def completed(self, client: httpx.AsyncClient, output: str) -> None:
        """The completion notice with the final row (the database is left as it is)."""
        pending = (await client.get(f"/results/{self.result_id}")).json()
        final = {**pending, "status": "completed", "output": output, "finish_reason": "length"}
        final |= {"completion_tokens": 2, "prompt_tokens": 2, "finished_at": pending["updated_at"]}
        row = ResultOut.model_validate(final).model_dump_json().encode()
        await self.redis.publish(done_channel(self.settings), notice(uuid.UUID(self.result_id), row))

    async def close(self) -> None:
        await self.redis.delete(self.key)
        await self.redis.aclose()


async def test_a_notice_ahead_of_the_last_piece_leaves_the_stream_waiting_for_it(
    client: httpx.AsyncClient,
) -> None:
    # The worker's flush of its last piece and its write of the row race: the notice may come first.
    worker = _Worker(await _streamed_job(client, "wait for me"))

    async def play() -> None:
        await worker.follower_ready()
        await worker.piece(1, "Hello")
        await asyncio.sleep(0.2)
        await worker.completed(client, "Hello world")  # the row has more text than came
        await asyncio.sleep(0.3)
        await worker.piece(2, " world")
        await worker.end_marker(3)

    try:
        stream, _ = await asyncio.gather(
            client.get(f"/results/{worker.result_id}/stream", timeout=20), play()
        )
    finally:
        await worker.close()
    events = _events(stream.text)
    assert [json.loads(d)["text"] for e, _, d in events if e == "token"] == ["Hello", " world"]
    assert events[-1][:2] == ("done", "3")


@dataclass
class _Reader:
    """An SSE client driven over ASGI as uvicorn serves the app: it reads until `enough(body so
    far)`, then leaves while the server may still have more to write. Its socket is slow (each
    write takes 20 ms), so the server's side runs ahead of it."""

    enough: Callable[[bytes], bool]
    sent: list[dict[str, Any]] = field(default_factory=list)
    leaves_after_s: float = 0.0  # from `enough` to the disconnect

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent)

    async def request(self, app: Any, method: str, path: str, key: str, json_body: Any = None) -> None:
        payload = json.dumps(json_body).encode() if json_body is not None else b""
        headers = [(b"host", b"api.test"), (b"authorization", f"Bearer {key}".encode())]
        if json_body is not None:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},  # uvicorn's, as it reports it
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("api.test", 80),
        }
        left = asyncio.Event()
        asked = 0

        async def receive() -> dict[str, Any]:
            nonlocal asked
            asked += 1
            if asked == 1:
                return {"type": "http.request", "body": payload, "more_body": False}
            await left.wait()
            await asyncio.sleep(self.leaves_after_s)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if left.is_set():
                return  # uvicorn drops what is written after the client left
            self.sent.append(message)
            if self.enough(self.body):
                left.set()
            await asyncio.sleep(0.02)

        await asyncio.wait_for(app(scope, receive, send), 20)


async def test_a_reader_that_leaves_mid_stream_ends_it_without_an_error(
    api_app: InProcessApi, caplog: pytest.LogCaptureFixture
) -> None:
    # FastAPI 0.165's own SSE relay raised from its task group here ("Exception in ASGI application").
    worker = _Worker(await _streamed_job(api_app.user, "leave early"))
    try:
        for seq in range(1, 201):  # a late reader gets all of these at once
            await worker.redis.xadd(worker.key, {TEXT_FIELD: f" {seq}".encode()}, id=entry_id(seq))
        reader = _Reader(lambda body: body.count(b"event:") >= 3)
        await reader.request(api_app.app, "GET", f"/results/{worker.result_id}/stream", _key(api_app))
        assert reader.sent[0]["type"] == "http.response.start" and reader.sent[0]["status"] == 200
        assert len(reader.sent) < 50  # it stopped writing when the client left
        runtime = api_app.app.state.runtime
        for _ in range(100):  # and its follower is gone: nothing is kept for a client that left
            if not runtime.token_streams._followers:
                break
            await asyncio.sleep(0.02)
        assert not runtime.token_streams._followers
    finally:
        await worker.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _key(api_app: InProcessApi) -> str:
    return api_app.user.headers["authorization"].removeprefix("Bearer ")


async def test_a_stream_with_nothing_to_send_yet_keeps_the_connection_alive(
    api_app: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams_service, "QUIET_S", 0.1)
    result_id = await _streamed_job(api_app.user, "queued for a while")  # no worker: it stays queued
    reader = _Reader(lambda body: body.count(KEEPALIVE) >= 3)
    await reader.request(api_app.app, "GET", f"/results/{result_id}/stream", _key(api_app))
    assert reader.sent[0]["status"] == 200 and reader.body == KEEPALIVE * 3


async def test_an_openai_stream_with_nothing_to_send_yet_keeps_the_connection_alive(
    api_app: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams_service, "QUIET_S", 0.1)
    reader = _Reader(lambda body: body.count(KEEPALIVE) >= 3)
    call = {"model": FAST_MODEL, "prompt": "queued for a while", "max_tokens": 4, "stream": True}
    await reader.request(api_app.app, "POST", "/v1/completions", _key(api_app), call)
    assert reader.sent[0]["status"] == 200
    first_chunk, rest = reader.body.split(b"\n\n", 1)  # the role/empty chunk, then only keep-alives
    assert first_chunk.startswith(b"data: {") and rest == KEEPALIVE * 3


async def test_hundreds_of_concurrent_stream_reads_wait_for_a_connection_instead_of_failing() -> None:
    # Each blocking read holds a connection: 300 at once is three times the pool.
    reader = TokenStreamReader(get_settings())
    try:
        reads = await asyncio.gather(
            *(reader.read(uuid.uuid4(), 0, block_ms=200) for _ in range(300)), return_exceptions=True
        )
    finally:
        await reader.close()
    assert [r for r in reads if isinstance(r, BaseException)] == []


async def test_a_reader_that_leaves_during_a_read_of_the_row_costs_the_pool_nothing(
    api_app: InProcessApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(streams_service, "QUIET_S", 0.0)  # read the row at once, again and again
    real_get = results_repo.get

    async def slow_get(conn: Any, result_id: uuid.UUID, tenant: str | None) -> Any:
        await conn.execute("SELECT pg_sleep(0.3)")  # the client leaves while this runs
        return await real_get(conn, result_id, tenant)

    monkeypatch.setattr(results_repo, "get", slow_get)
    result_id = await _streamed_job(api_app.user, "queued while its reader leaves")
    pool = api_app.app.state.runtime.db.pool
    before = pool.get_stats().get("returns_bad", 0)
    reader = _Reader(lambda body: True, leaves_after_s=0.1)  # in the middle of the first read
    await reader.request(api_app.app, "GET", f"/results/{result_id}/stream", _key(api_app))
    await asyncio.sleep(0.5)  # the read it left behind ends
    assert pool.get_stats().get("returns_bad", 0) == before
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
