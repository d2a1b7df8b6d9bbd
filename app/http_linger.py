"""A malformed request's 400 reaches its client.

uvicorn answers a request its parser refuses (say `Content-Length` with `Transfer-Encoding: chunked`)
and closes the connection at once. A client still sending (the rest of the body) then gets a reset,
which can destroy the answer before the client has read it: it sees a broken pipe, not the 400.
Here the answer is followed by a half-close, and what the client still sends is read and dropped (up
to `LINGER_BYTES`, for at most `LINGER_S`) before the connection is closed: a lingering close.
Written against uvicorn 0.54's httptools protocol; any other version keeps uvicorn's own.
"""

from __future__ import annotations

from typing import Any

from app.version_guard import library_patch

PATCHED_VERSIONS = ("0.54.",)
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024


@library_patch("uvicorn", PATCHED_VERSIONS, "the lingering close after a malformed request")
def linger_after_bad_requests() -> bool:
    """Whether it is applied: False on a uvicorn it was not written for, or without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn runs h11, left as it is
        return False

    receive = HttpToolsProtocol.data_received
    end_of_input = HttpToolsProtocol.eof_received

    def send_400_response(self: Any, msg: str) -> None:
        # uvicorn's answer as it writes it, then a half-close instead of its close.
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
        transport = self.transport
        transport.write(b"".join(content))
        self._llmq_lingered = 0
        if transport.can_write_eof():
            transport.write_eof()  # sent after the answer: the client reads it, then the end
        self.loop.call_later(LINGER_S, transport.close)

    def data_received(self: Any, data: bytes) -> None:
        lingered = getattr(self, "_llmq_lingered", None)
        if lingered is None:
            receive(self, data)
            return
        self._llmq_lingered = lingered + len(data)  # dropped: the answer is out already
        if self._llmq_lingered > LINGER_BYTES:
            self.transport.close()

    def eof_received(self: Any) -> None:
        if getattr(self, "_llmq_lingered", None) is not None:
            self.transport.close()  # the client has sent all it had: nothing to wait for
            return
        end_of_input(self)

    HttpToolsProtocol.send_400_response = send_400_response  # type: ignore[method-assign]
    HttpToolsProtocol.data_received = data_received  # type: ignore[method-assign]
    HttpToolsProtocol.eof_received = eof_received  # type: ignore[method-assign]
    return True
