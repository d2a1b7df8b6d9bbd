"""Request bodies: JSON, bounded while they are read, and a refused body still gets its answer; the
helpers that read, discard and replay a body (authentication, the fast path) are here too.

A client that is still sending when the server answers and closes sees a broken pipe or a reset
instead of the 413 (urllib, requests): the rest of the body, up to `drain_bytes`, is read and
discarded before the answer is sent, and the connection is closed only after it. A client that sent
`Expect: 100-continue` has not sent its body: it is answered at once, without the body asked for
(which would send the 100), and its connection closes after the answer (app.http_protocol lingers).
Two Content-Type headers are refused (400): the readers of the request would not agree on one.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import render_error

# Every body the API takes is JSON.
_JSON_TYPE = re.compile(rb"^\s*application/([\w.-]+\+)?json\s*(;|$)", re.IGNORECASE)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int = 64 * 1024 * 1024) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, content_type, has_body, headers_flags = _body_headers(scope)
        # A client sending Expect: 100-continue waits for the 100 before its body: a refusal decided
        # from the head is sent at once, without asking for (and draining) the body.
        waits = has_body and bool(headers_flags & _EXPECTS_CONTINUE)
        if headers_flags & _TWO_CONTENT_TYPES:
            if not waits:
                await self._drain(receive, 0)
            message = "the request has more than one Content-Type header: send one"
            await _refuse(scope, receive, send, 400, message, "duplicate_content_type")
            return
        if content_type is None and has_body:  # unlabelled: read as the JSON it must be
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        elif content_type is not None and has_body and not _JSON_TYPE.match(content_type):
            # Read as JSON, a form or a text body fails as "not an object": say what is wrong.
            if not waits:
                await self._drain(receive, 0)
            shown = content_type[:100].decode("latin-1")
            message = (
                f"the request body must be JSON, sent with Content-Type: application/json (not {shown!r})"
            )
            await _refuse(scope, receive, send, 415, message, "unsupported_media_type")
            return
        if declared is not None and declared > self.max_bytes:
            if not waits:
                await self._drain(receive, 0)
            await self._too_large(scope, receive, send, f"request body is {declared} bytes")
            return

        received = 0
        refused = False

        async def bounded_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if message.get("more_body", False):
                        await self._drain(receive, received)
                    # What the app sees: the end of the body; the 413 below replaces its answer.
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        gate = _ContinueGate(bounded_receive) if waits else None
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the app answered a truncated body: drop it, the 413 goes out instead
            if message["type"] == "http.response.start":
                started = True
                if gate is not None and not gate.asked:
                    # Answered before the body was asked for: the client may send it or not, so the
                    # connection cannot frame a next request; it closes after this answer.
                    message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
            await send(message)

        await self.app(scope, gate or bounded_receive, guarded_send)
        if refused and not started:
            await self._too_large(scope, receive, send, f"request body is over {self.max_bytes} bytes")

    async def _drain(self, receive: Receive, seen: int) -> None:
        await discard_body(receive, self.drain_bytes - seen)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        message = f"{what}; the limit is {self.max_bytes} bytes"
        await _refuse(scope, receive, send, 413, message, "request_too_large")


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, code: str) -> None:
    """A refused body's answer; the connection closes after it (the body may not have been read whole)."""
    response = render_error(scope["path"], status, message, headers={"connection": "close"}, code=code)
    await response(scope, receive, send)


_TWO_CONTENT_TYPES = 1
_EXPECTS_CONTINUE = 2
_CLOSE = (b"connection", b"close")


def _body_headers(scope: Scope) -> tuple[int | None, bytes | None, bool, int]:
    """Content-Length (None: absent or not a number), Content-Type, whether a body comes, and flags
    (_TWO_CONTENT_TYPES, _EXPECTS_CONTINUE); one pass over the headers, as every request makes it."""
    declared: int | None = None
    content_type: bytes | None = None
    chunked = False
    flags = 0
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            declared = int(value) if value.isdigit() else None
        elif name == b"content-type":
            if content_type is not None:  # readers would disagree on which one counts
                flags |= _TWO_CONTENT_TYPES
            content_type = bytes(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"expect" and value.lower() == b"100-continue":
            flags |= _EXPECTS_CONTINUE
    return declared, content_type, bool(declared) or chunked, flags


class _ContinueGate:
    """The `receive` of a request sent with Expect: 100-continue: whether the body was asked for
    (uvicorn sends the 100 Continue at the first `receive`)."""

    __slots__ = ("asked", "receive")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.asked = False

    async def __call__(self) -> Message:
        self.asked = True
        return await self.receive()


async def discard_body(receive: Receive, limit: float = float("inf")) -> None:
    """Read the rest of the body (up to `limit` more bytes) and drop it; a body the client has not
    been asked for (Expect: 100-continue) is not asked for."""
    if isinstance(receive, _ContinueGate) and not receive.asked:
        return
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def read_body(receive: Receive) -> bytes | None:
    """The whole body; None if the client went away."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the already-read body again (to hand a request on)."""
    replayed = False

    async def receive_again() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
