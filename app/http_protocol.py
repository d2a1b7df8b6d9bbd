"""uvicorn's httptools protocol, hardened against clients that fill it or hold it.

- The request head is bounded: past `MAX_HEAD_BYTES` (request line and headers together) or
  `MAX_HEADERS` header fields it is answered 431 (a request target alone past the bound: 414).
- A request head must arrive whole within `HEAD_TIMEOUT_S` of the connection's start, or of the
  previous answer once it has begun (a connection idle between requests is the keep-alive timeout's);
  a body that makes no progress for `BODY_TIMEOUT_S` ends the connection (408 if nothing was answered).
- Those answers and uvicorn's 400 for a malformed request get a lingering close: the answer, a
  half-close, then what the client still sends is read and dropped (up to `LINGER_BYTES`, for at most
  `LINGER_S`); closed at once, a client still sending would get a reset instead of the answer.
- A request sent with `Expect: 100-continue` answered before its body was asked for (app.bodylimit
  closes its connection) gets the lingering close too: the client may send that body after all.
- Past `--limit-concurrency`, the 503 is the API's JSON error instead of uvicorn's plain text.

The normal path only counts the head's bytes; the timeouts are checked by one sweep a second.
Written against uvicorn 0.54's httptools protocol; any other version keeps uvicorn's own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import Receive, Scope, Send

from app.errors import render_error
from app.version_guard import library_patch

log = logging.getLogger(__name__)

PATCHED_VERSIONS = ("0.54.",)
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
SWEEP_S = 1.0


def head_size(protocol: Any) -> int:
    """The received request head's size: its target and header fields (with their separators)."""
    return len(protocol.url) + sum(len(name) + len(value) + 4 for name, value in protocol.headers)


def linger(protocol: Any) -> None:
    """End the connection after what was written: a half-close, then what comes is dropped."""
    transport = protocol.transport
    protocol._llmq_lingered = 0
    if transport.can_write_eof():
        transport.write_eof()  # sent after the answer: the client reads it, then the end
    protocol.loop.call_later(LINGER_S, transport.close)


class _LingeringClose:
    """The transport of a request sent with Expect: 100-continue, as its cycle uses it: answered
    without its body asked for, the connection closes, and the client may be sending that body."""

    def __init__(self, protocol: Any, transport: asyncio.Transport) -> None:
        self._protocol = protocol
        self._transport = transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        if self._transport.is_closing() or self._protocol._llmq_lingered is not None:
            return
        linger(self._protocol)


class _Refused(Exception):
    """Raised in a parser callback: the parser stops, the protocol sends the refusal it has noted."""


def _path(protocol: Any) -> str:
    """The request's path as far as it was received (it picks the error's shape)."""
    url: bytes = getattr(protocol, "url", b"")
    return url[:256].partition(b"?")[0].decode("latin-1")


def error_answer(
    path: str, status: int, message: str, code: str, default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    """The API's JSON error as bytes on the wire, ending the connection."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    response = render_error(path, status, message, headers={"connection": "close"}, code=code)
    content = [STATUS_LINE[status]]
    for name, value in [*default_headers, *response.raw_headers]:
        content += [name, b": ", value, b"\r\n"]
    content += [b"\r\n", bytes(response.body)]
    return b"".join(content)


async def over_the_limit(scope: Scope, receive: Receive, send: Send) -> None:
    """What a request past `--limit-concurrency` is answered."""
    message = "the server has as many connections as it takes; try again shortly"
    headers = {"connection": "close", "retry-after": "1"}
    await render_error(scope["path"], 503, message, headers=headers, code="overloaded")(scope, receive, send)


@library_patch("uvicorn", PATCHED_VERSIONS, "the request head bounds, timeouts and lingering close")
def harden_http_protocol() -> bool:
    """Whether it is applied: False on a uvicorn it was not written for, or without httptools."""
    try:
        import httptools
        from uvicorn.protocols.http import httptools_impl
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn runs h11, left as it is
        return False

    # uvicorn's own methods, kept on the class: a second application (tests) wraps them, not itself.
    originals: dict[str, Any] = HttpToolsProtocol.__dict__.get("_llmq_originals") or {
        name: getattr(HttpToolsProtocol, name) for name in ("connection_made", "on_headers_complete")
    }
    HttpToolsProtocol._llmq_originals = originals  # type: ignore[attr-defined]
    made = originals["connection_made"]
    headers_complete = originals["on_headers_complete"]

    # Per-connection state, as class defaults: a connection sets only what changes.
    defaults = {
        "_llmq_lingered": None,  # bytes dropped since the answer that ends the connection
        "_llmq_refusal": None,  # (status, message, code) noted by a parser callback
        "_llmq_received": 0,  # bytes received on the connection
        "_llmq_head_open": True,  # a request head is (or will be) being received
        "_llmq_head_from": 0,  # _llmq_received when that head began (at most one read later)
        "_llmq_since": 0.0,  # the connection's start or the last answer's end
        "_llmq_seen": 0,  # _llmq_received at the last sweep that saw it change
        "_llmq_seen_at": 0.0,
    }
    for name, value in defaults.items():
        setattr(HttpToolsProtocol, name, value)

    def answer_and_linger(self: Any, answer: bytes) -> None:
        transport = self.transport
        if transport.is_closing() or self._llmq_lingered is not None:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's answer, if any comes, is dropped: this one is out
            cycle.message_event.set()
        self._unset_keepalive_if_required()
        transport.write(answer)
        linger(self)

    def refuse(self: Any, status: int, message: str, code: str) -> None:
        log.info("%s %s: %s", status, self.client, message)
        answer_and_linger(
            self, error_answer(_path(self), status, message, code, self.server_state.default_headers)
        )

    def note_refusal(self: Any, status: int, message: str, code: str) -> _Refused:
        self._llmq_refusal = (status, message, code)
        return _Refused(message)

    def send_400_response(self: Any, msg: str) -> None:
        # uvicorn's answer as it writes it, then the lingering close instead of its close.
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        body = msg.encode("ascii")
        content += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        answer_and_linger(self, b"".join(content))

    def connection_made(self: Any, transport: asyncio.Transport) -> None:
        made(self, transport)
        self._llmq_since = self._llmq_seen_at = self.loop.time()
        state = self.server_state
        if not getattr(state, "_llmq_sweeping", False):
            state._llmq_sweeping = True
            self.loop.call_later(SWEEP_S, sweep, state, self.loop)

    def data_received(self: Any, data: bytes) -> None:
        # uvicorn's, with the head's bytes counted and the refusals answered.
        if self._llmq_lingered is not None:
            self._llmq_lingered += len(data)  # dropped: the answer is out already
            if self._llmq_lingered > LINGER_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        self._llmq_received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._llmq_refusal is not None:
                refuse(self, *self._llmq_refusal)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._llmq_head_open and self._llmq_received - self._llmq_head_from > MAX_HEAD_BYTES:
            refuse(self, 431, f"the request head is over {MAX_HEAD_BYTES} bytes", "header_fields_too_large")

    def eof_received(self: Any) -> None:
        if self._llmq_lingered is not None:
            self.transport.close()  # the client has sent all it had: nothing to wait for

    def on_url(self: Any, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_HEAD_BYTES:
            raise note_refusal(
                self, 414, f"the request target is over {MAX_HEAD_BYTES} bytes", "uri_too_long"
            )

    def on_header(self: Any, name: bytes, value: bytes) -> None:
        # uvicorn's, with the fields counted.
        if len(self.headers) >= MAX_HEADERS:
            message = f"the request has more than {MAX_HEADERS} header fields"
            raise note_refusal(self, 431, message, "header_fields_too_large")
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self: Any) -> None:
        self._llmq_head_open = False
        # A head that came whole in a read of more than the bound (sized only then: rare).
        if self._llmq_received - self._llmq_head_from > MAX_HEAD_BYTES and head_size(self) > MAX_HEAD_BYTES:
            message = f"the request head is over {MAX_HEAD_BYTES} bytes"
            raise note_refusal(self, 431, message, "header_fields_too_large")
        headers_complete(self)
        if self.expect_100_continue and self.cycle is not None and self.cycle.scope is self.scope:
            self.cycle.transport = _LingeringClose(self, self.cycle.transport)

    def on_message_complete(self: Any) -> None:
        # uvicorn's, with the next head's start noted.
        self._llmq_head_open = True
        self._llmq_head_from = self._llmq_received
        if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
            return
        self.cycle.more_body = False
        self.cycle.message_event.set()

    def on_response_complete(self: Any) -> None:
        # uvicorn's, with the answer's end noted (the next head's timeout counts from it).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._llmq_since = self.loop.time()
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def check(self: Any, now: float) -> None:
        """Close a connection whose request head or body is overdue."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._llmq_lingered is not None:
            return
        received = self._llmq_received
        if received != self._llmq_seen:
            self._llmq_seen, self._llmq_seen_at = received, now
        cycle = self.cycle
        if self._llmq_head_open:
            began = received != self._llmq_head_from
            if cycle is not None and (not cycle.response_complete or not began):
                return  # being answered, or idle after an answer (the keep-alive timeout's)
            if now - self._llmq_since <= HEAD_TIMEOUT_S:
                return
            if not began:
                transport.close()  # a connection that never sent a byte: nothing to answer
                return
            message = f"the request head did not arrive whole within {HEAD_TIMEOUT_S:g} s"
            refuse(self, 408, message, "request_timeout")
        elif cycle is not None:  # a body is arriving
            if self.flow.read_paused or cycle.waiting_for_100_continue:
                self._llmq_seen_at = now  # the server is not reading: the client is not late
                return
            if now - self._llmq_seen_at <= BODY_TIMEOUT_S:
                return
            if cycle.response_started:
                transport.close()
                return
            message = f"the request body made no progress for {BODY_TIMEOUT_S:g} s"
            refuse(self, 408, message, "request_timeout")

    def sweep(state: Any, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for connection in list(state.connections):
            if isinstance(connection, HttpToolsProtocol):
                try:
                    check(connection, now)
                except Exception:  # one connection's trouble must not end the sweeps
                    log.exception("checking a connection's timeouts")
        loop.call_later(SWEEP_S, sweep, state, loop)

    patched = {
        "send_400_response": send_400_response,
        "connection_made": connection_made,
        "data_received": data_received,
        "eof_received": eof_received,
        "on_url": on_url,
        "on_header": on_header,
        "on_headers_complete": on_headers_complete,
        "on_message_complete": on_message_complete,
        "on_response_complete": on_response_complete,
    }
    for name, function in patched.items():
        setattr(HttpToolsProtocol, name, function)
    httptools_impl.service_unavailable = over_the_limit  # type: ignore[attr-defined,assignment]
    return True
