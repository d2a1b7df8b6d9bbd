"""A streamed OpenAI answer whose source fails after the answer began (Postgres or Redis gone) ends
with an error event in OpenAI's shape, which the SDK raises, instead of a cut connection. The
source is played by hand here; tests/e2e/test_postgres_outage.py stops a real Postgres under an
open `GET /results/{id}/stream`, which shares the error mapping (`app.errors.stream_error`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from app.errors import DATABASE_DOWN, REDIS_DOWN
from app.schemas_openai import CompletionRequest
from app.services import openai_stream, streams
from app.services.openai import Call
from app.streams import Piece

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), DATABASE_DOWN),
        (RedisConnectionError("Connection refused"), REDIS_DOWN),
    ],
)
async def test_an_outage_mid_stream_ends_the_answer_with_an_error_event(
    monkeypatch: pytest.MonkeyPatch, failure: Exception, message: str
) -> None:
    async def follow(*args: Any) -> AsyncIterator[Piece]:
        yield Piece(1, "Hello")
        raise failure

    monkeypatch.setattr(streams, "follow", follow)
    request = CompletionRequest(model="sim-llm", prompt="Say hello", stream=True)
    call = Call(endpoint="completions", model="sim-llm", prompts=[], n=1, params={}, request=request)
    body = [chunk async for chunk in openai_stream.chunks(None, None, None, None, call, [uuid.uuid4()])]  # type: ignore[arg-type]
    events = [json.loads(chunk.removeprefix(b"data: ")) for chunk in body]
    assert [e["choices"][0]["text"] for e in events[:2]] == ["", "Hello"]
    assert events[-1] == {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
