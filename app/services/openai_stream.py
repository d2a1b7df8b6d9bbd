"""Streamed OpenAI answers (`stream: true`): the jobs' token streams as `chat.completion.chunk` (or
`text_completion`) server-sent events, ending with `data: [DONE]`.

Each choice is a job sent with `"stream": true`; its pieces come from the same token stream as
`GET /results/{id}/stream` (app/services/streams.py), so the answer can come from any API process
and a client that leaves does not stop the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from app import sse
from app.auth import Principal
from app.db import Database
from app.errors import AppError, ServiceUnavailable, openai_error_body, stream_error
from app.notify import ResultWaiter
from app.schemas_openai import Usage
from app.services import streams
from app.services.openai import Call, job_error, jobs_exist_error, usage
from app.streams import Piece, Restart, TokenStreamReader

# A chunk cannot be taken back: a job run again after some of its text was sent ends the answer.
RESTARTED = ServiceUnavailable(
    "the generation was interrupted (its worker stopped) and runs again from the start: "
    "the text streamed so far is void; send the request again",
    code="generation_restarted",
)


def _event(payload: Any) -> bytes:
    return sse.event(json.dumps(payload, ensure_ascii=False))


class _Chunks:
    """The chunk objects of one call, all with the first job's id, as OpenAI gives one id per call."""

    def __init__(self, call: Call, result_ids: list[uuid.UUID]) -> None:
        self.chat = call.endpoint == "chat.completions"
        self.base = {
            "id": str(result_ids[0]),
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": call.model,
            "system_fingerprint": None,
        }

    def choice(self, index: int, text: str | None, finish_reason: str | None, first: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text is not None else {}
            if first:
                delta = {"role": "assistant", "content": text or ""}
            choice: dict[str, Any] = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return _event({**self.base, "choices": [choice]})

    def usage(self, counts: Usage) -> bytes:
        return _event({**self.base, "choices": [], "usage": counts.model_dump()})


# How long the answer's status waits for the jobs' first piece of text or end: a job the engine
# refuses at once (a prompt over the model's context) is then the call's error status, as OpenAI
# answers it, not an error event after a 200. Past it the answer begins, the jobs still queued.
HOLD_S = 10.0

_Item = tuple[int, Piece | Restart | streams.Quiet | streams.Final] | None


async def chunks(
    db: Database,
    waiter: ResultWaiter,
    token_streams: TokenStreamReader,
    principal: Principal,
    call: Call,
    result_ids: list[uuid.UUID],
    hold_s: float = HOLD_S,
    *,
    keyed: bool = False,
) -> AsyncIterator[bytes]:
    """The SSE body: every choice's pieces as they come (choices interleaved), each choice's end
    with its finish reason, the usage when asked, then `[DONE]`. Raises the error of a job that
    ends without text before its first piece (within `hold_s`); later, a job that fails or is
    cancelled ends the answer with an `error` event saying why (the SDK raises it)."""
    queue: asyncio.Queue[_Item] = asyncio.Queue()

    async def follow(index: int, result_id: uuid.UUID) -> None:
        async for event in streams.follow(db, waiter, token_streams, principal, result_id, 0):
            await queue.put((index, event))

    async def run_all() -> None:
        try:
            await asyncio.gather(*(follow(i, rid) for i, rid in enumerate(result_ids)))
        finally:
            await queue.put(None)

    feeder = asyncio.ensure_future(run_all())
    held: list[_Item] = []
    try:
        give_up = asyncio.get_running_loop().time() + hold_s
        while not held or isinstance(held[-1][1], streams.Quiet):  # type: ignore[index]
            try:
                held.append(await asyncio.wait_for(queue.get(), give_up - asyncio.get_running_loop().time()))
            except TimeoutError:
                break
            if held[-1] is None:
                feeder.result()  # a failure while following (e.g. the database) is the answer's status
                break
        first = held[-1] if held else None
        if (
            first is not None
            and isinstance(first[1], streams.Final)
            and first[1].result.status != "completed"
        ):
            raise job_error(json.loads(first[1].result.model_dump_json()), result_ids)
    except BaseException:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeder
        raise
    return _body(call, result_ids, queue, feeder, held, keyed)


async def _body(
    call: Call,
    result_ids: list[uuid.UUID],
    queue: asyncio.Queue[_Item],
    feeder: asyncio.Future[None],
    held: list[_Item],
    keyed: bool,
) -> AsyncIterator[bytes]:
    out = _Chunks(call, result_ids)
    for index in range(len(result_ids)):
        yield out.choice(index, "", None, first=True)
    finals: dict[int, dict[str, Any]] = {}
    sent_text: set[int] = set()  # the choices some text of which was sent
    try:
        while True:
            item = held.pop(0) if held else await queue.get()
            if item is None:
                break
            index, event = item
            if isinstance(event, streams.Quiet):
                yield sse.KEEPALIVE
                continue
            if isinstance(event, Piece):
                yield out.choice(index, event.text, None)
                sent_text.add(index)
                continue
            if isinstance(event, Restart):
                if index in sent_text:
                    yield _event(_error_body(RESTARTED))
                    return
                continue
            row = json.loads(event.result.model_dump_json())
            if row["status"] != "completed":
                yield _event(_error_body(job_error(row, result_ids)))
                return
            finals[index] = row
            yield out.choice(index, None if out.chat else "", row.get("finish_reason") or "stop")
        feeder.result()  # a failure while following (e.g. the database) is raised here
        if call.include_usage and len(finals) == len(result_ids):
            yield out.usage(usage(call, [finals[i] for i in range(len(result_ids))]))
        yield b"data: [DONE]\n\n"
    except Exception as exc:  # the answer has begun: an error event says why it stops here
        error = stream_error(exc)
        if error is None:
            raise
        if isinstance(error, ServiceUnavailable):  # an outage, or this process stopping
            error = jobs_exist_error(error, result_ids, keyed)
        yield _event(_error_body(error))
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeder


def _error_body(error: AppError) -> dict[str, Any]:
    return openai_error_body(error.status_code, error.message, code=error.code)
