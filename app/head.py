"""HEAD requests, answered as the GET of the same URL without its body (RFC 9110: a server that
answers GET answers HEAD). FastAPI's routes declare GET only, so without this every HEAD, an uptime
monitor's health check say, was a 405."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_GONE: Message = {"type": "http.disconnect"}


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        head_sent = asyncio.Event()

        async def head_receive() -> Message:
            # Once the head is out, the client is done with the answer: a streamed body (a token
            # stream, an export) stops instead of running to its end unread.
            if head_sent.is_set():
                return _GONE
            received = asyncio.ensure_future(receive())
            sent = asyncio.ensure_future(head_sent.wait())
            await asyncio.wait((received, sent), return_when=asyncio.FIRST_COMPLETED)
            if received.done():
                sent.cancel()
                return received.result()
            received.cancel()
            return _GONE

        async def head_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                await send(message)  # the GET's headers, Content-Length included
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                head_sent.set()
            # The GET's body is dropped.

        # Starlette stops a streamed body on the client's disconnect only below ASGI spec 2.4.
        asgi = {**scope.get("asgi", {}), "spec_version": "2.3"}
        await self.app({**scope, "method": "GET", "asgi": asgi}, head_receive, head_send)
