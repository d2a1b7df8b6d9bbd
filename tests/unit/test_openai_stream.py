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
    job = uuid.uuid4()
    answer = await openai_stream.chunks(None, None, None, None, call, [job])  # type: ignore[arg-type]
    body = [chunk async for chunk in answer]
    events = [json.loads(chunk.removeprefix(b"data: ")) for chunk in body]
    assert [e["choices"][0]["text"] for e in events[:2]] == ["", "Hello"]
    # The cause, and that the job goes on (not "try again": a retry would make it twice).
    said = f"{message.split(';')[0]}; the job(s) go on: poll GET /results/{{id}} for {job}"
    assert events[-1] == {"error": {"message": said, "type": "server_error", "param": None, "code": None}}


async def test_a_job_that_ends_in_error_before_any_text_is_the_answers_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused by the engine (a prompt over the context): a 400 before the answer begins, as OpenAI
    answers, not an error event after a 200."""
    from app.errors import AppError
    from app.schemas import ResultOut

    row = {
        "id": str(uuid.uuid4()),
        "tenant": "t",
        "context_id": str(uuid.uuid4()),
        "model": "sim-llm",
        "params": {},
        "status": "failed",
        "output": None,
        "error": "the engine refused the request: prompt too long",
        "finish_reason": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "attempts": 1,
        "created_at": "2026-01-01T00:00:00Z",
        "started_at": None,
        "finished_at": "2026-01-01T00:00:01Z",
        "updated_at": "2026-01-01T00:00:01Z",
        "images": 0,
    }

    async def follow(*args: Any) -> AsyncIterator[Any]:
        yield streams.Final(1, ResultOut.model_validate(row))

    monkeypatch.setattr(streams, "follow", follow)
    request = CompletionRequest(model="sim-llm", prompt="Say hello", stream=True)
    call = Call(endpoint="completions", model="sim-llm", prompts=[], n=1, params={}, request=request)
    with pytest.raises(AppError) as raised:
        await openai_stream.chunks(None, None, None, None, call, [uuid.UUID(row["id"])])  # type: ignore[arg-type]
    assert raised.value.status_code in (400, 502)
