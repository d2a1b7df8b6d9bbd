"""Server-sent event answers: every event stream the API serves (a job's tokens, OpenAI chunks)
goes out this way, as a plain streaming response of events formatted by FastAPI's `format_sse_event`.

Not FastAPI's `EventSourceResponse` machinery: it relays each event through two memory streams and
a task group, and in FastAPI 0.165 a client leaving mid-stream can make that task group raise
(an "Exception in ASGI application" with a trace for an ordinary disconnect). Keep-alives come
from the streams' own quiet spells instead of a timer per event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from fastapi.responses import StreamingResponse
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event
from starlette.types import Receive, Scope, Send

# A comment line: clients ignore it, proxies see traffic and keep the connection open.
KEEPALIVE = KEEPALIVE_COMMENT
MEDIA_TYPE = "text/event-stream"
# No caching, and no buffering by Nginx-style proxies: each event goes out as it is written.
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Legal raw in a JSON string, but clients that split lines as str.splitlines() does (httpx's
# iter_lines, httpx-sse) would cut an event or a JSON line there. Other line breaks are escaped by JSON.
_LINE_SEPARATORS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def one_line(json_text: str) -> str:
    """Serialized JSON with its strings' Unicode line separators escaped: one line for every reader."""
    return json_text.translate(_LINE_SEPARATORS)


def event(data: str, *, name: str | None = None, event_id: int | None = None) -> bytes:
    """One event; `data` is already serialized (JSON), so line separators can only be in its strings."""
    data = one_line(data)
    return format_sse_event(data_str=data, event=name, id=None if event_id is None else str(event_id))


class EventStreamResponse(StreamingResponse):
    """Closes its body when the answer ends, also when the client left mid-stream: Starlette only
    stops iterating, which would leave the body's resources (a stream's follower) to the garbage
    collector."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def response(body: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> StreamingResponse:
    return EventStreamResponse(body, media_type=MEDIA_TYPE, headers={**_HEADERS, **(headers or {})})


def openapi_response(description: str) -> dict[str, object]:
    """The OpenAPI entry of a 200 answered with events."""
    return {"description": description, "content": {MEDIA_TYPE: {"schema": {"type": "string"}}}}
