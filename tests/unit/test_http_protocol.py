"""The hardened httptools protocol (app.http_protocol) through a real uvicorn and raw sockets: bounded
request heads, head and body timeouts, the JSON 503 past --limit-concurrency, and the patch applying
only to the uvicorn it was written for. (The real API process: tests/e2e/test_body_limit.py.)"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from devstack.processes import free_port
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app import http_protocol


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body, answers its size; /refuse answers 401 without reading it."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/refuse":  # as app.bodylimit answers an Expect: 100-continue it refuses
        headers = [(b"content-length", b"2"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b"no"})
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"received": size}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Served:
    def __init__(self, **config: Any) -> None:
        self.port = free_port()
        cfg = uvicorn.Config(
            echo_app, host="127.0.0.1", port=self.port, http="httptools", log_level="warning", **config
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture
def hardened(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The patch applied, with short timeouts so that the tests wait seconds, not minutes."""
    http_protocol.harden_http_protocol.cache_clear()  # type: ignore[attr-defined]
    assert http_protocol.harden_http_protocol() is True
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT_S", 1.0)
    monkeypatch.setattr(http_protocol, "BODY_TIMEOUT_S", 1.0)
    monkeypatch.setattr(http_protocol, "SWEEP_S", 0.2)
    yield


def read_all(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
    except ConnectionResetError:
        pass
    return answer


def _recv(sock: socket.socket, size: int) -> bytes:
    data = sock.recv(size)
    if not data:
        raise ConnectionError("the server closed the connection")
    return data


def read_one(sock: socket.socket) -> bytes:
    """One answer with a Content-Length, the connection left open; never reads past it (pipelined
    answers may come in one packet)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += _recv(sock, 1)
    length = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:]
    )
    body = b""
    while len(body) < length:
        body += _recv(sock, length - len(body))
    return head + body


def status_and_json(answer: bytes) -> tuple[bytes, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(body)


@pytest.mark.usefixtures("hardened")
def test_a_head_of_many_padding_headers_is_a_431_while_the_client_still_sends() -> None:
    # What grew the API by 65 MB per connection: header lines without end.
    with Served() as served, served.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Pad: " + b"a" * 4000 + b"\r\n"
        try:
            for _ in range(50):  # 200 KB: past the bound (the server stops reading at 1 MiB more)
                sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.shutdown(socket.SHUT_WR)
        status, body = status_and_json(read_all(sock))
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert body["error"] == f"the request head is over {http_protocol.MAX_HEAD_BYTES} bytes"


@pytest.mark.usefixtures("hardened")
@pytest.mark.parametrize(
    ("head", "status", "error"),
    [
        (
            b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(150)) + b"\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large",
            "the request has more than 100 header fields",
        ),
        (
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large",
            "the request head is over 65536 bytes",
        ),
        (
            b"GET /x?" + b"q" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HTTP/1.1 414 Request-URI Too Long",
            "the request target is over 65536 bytes",
        ),
    ],
    ids=["header-count", "one-big-header", "long-target"],
)
def test_a_head_over_its_bounds_is_refused_with_the_json_error(
    head: bytes, status: bytes, error: str
) -> None:
    with Served() as served, served.connect() as sock:
        sock.sendall(head)
        answer = read_all(sock)
    assert status_and_json(answer) == (status, {"error": error, "detail": None})


@pytest.mark.usefixtures("hardened")
def test_the_openai_surface_gets_its_error_shape() -> None:
    with Served() as served, served.connect() as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n"
        )
        status, body = status_and_json(read_all(sock))
    assert status.startswith(b"HTTP/1.1 431")
    assert (
        body["error"]["code"] == "header_fields_too_large"
        and body["error"]["type"] == "invalid_request_error"
    )


@pytest.mark.usefixtures("hardened")
def test_a_connection_that_never_sends_a_whole_head_is_closed() -> None:
    with Served(timeout_keep_alive=30) as served, served.connect() as silent, served.connect() as partial:
        partial.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        assert read_all(silent) == b""  # nothing to answer: just closed
        status, body = status_and_json(read_all(partial))
        assert time.monotonic() - started < 5
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert body["error"] == "the request head did not arrive whole within 1 s"


@pytest.mark.usefixtures("hardened")
def test_a_connection_idle_between_requests_is_the_keep_alive_timeouts() -> None:
    with Served(timeout_keep_alive=30) as served, served.connect() as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_one(sock).startswith(b"HTTP/1.1 200 OK")
        time.sleep(2)  # twice the head timeout: still open
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_one(sock).startswith(b"HTTP/1.1 200 OK")
        sock.sendall(b"GET /x HTTP/1.1\r\n")  # a next head begun, never finished
        status, _ = status_and_json(read_all(sock))
    assert status == b"HTTP/1.1 408 Request Timeout"


@pytest.mark.usefixtures("hardened")
def test_a_body_that_stops_arriving_is_a_408() -> None:
    with Served() as served, served.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\na")
        started = time.monotonic()
        status, body = status_and_json(read_all(sock))
        assert time.monotonic() - started < 5
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert body["error"] == "the request body made no progress for 1 s"


@pytest.mark.usefixtures("hardened")
def test_a_body_that_arrives_slowly_but_steadily_is_read() -> None:
    with Served() as served, served.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        for byte in b"abcd":
            time.sleep(0.6)  # 2.4 s in all, never 1 s without progress
            sock.sendall(bytes([byte]))
        answer = read_one(sock)
    assert status_and_json(answer) == (b"HTTP/1.1 200 OK", {"received": 4})


@pytest.mark.usefixtures("hardened")
def test_a_refusal_before_100_continue_reaches_a_client_that_sends_its_body_anyway() -> None:
    # curl sends the body after waiting a second for the 100; the server, answering without
    # reading it, closes: the unread body would turn that close into a reset that eats the answer.
    with Served() as served, served.connect() as sock:
        size = 512 * 1024  # within what the server drops while lingering
        sock.sendall(
            b"POST /refuse HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % size
        )
        time.sleep(0.3)  # answered and closed by now
        try:
            sock.sendall(b"z" * size)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while data := sock.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized") and answer.endswith(b"\r\n\r\nno")


@pytest.mark.usefixtures("hardened")
def test_past_the_concurrency_limit_the_503_is_the_json_error() -> None:
    with Served(limit_concurrency=1) as served, served.connect() as first, served.connect() as second:
        first.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        second.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = status_and_json(read_all(second))
    assert status == b"HTTP/1.1 503 Service Unavailable"
    assert body["error"].startswith("the server has as many connections as it takes")


@pytest.mark.usefixtures("hardened")
def test_ordinary_requests_and_pipelines_are_served() -> None:
    with Served() as served, served.connect() as sock:
        request = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        sock.sendall(request * 3)
        answers = [read_one(sock) for _ in range(3)]
    assert all(status_and_json(a) == (b"HTTP/1.1 200 OK", {"received": 3}) for a in answers)


def test_another_uvicorn_keeps_its_own_protocol(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    http_protocol.harden_http_protocol.cache_clear()  # type: ignore[attr-defined]
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0.99.0")
    before = dict(vars(HttpToolsProtocol))
    try:
        with caplog.at_level(logging.WARNING, logger="app.version_guard"):
            assert http_protocol.harden_http_protocol() is False
    finally:
        http_protocol.harden_http_protocol.cache_clear()  # type: ignore[attr-defined]
    assert dict(vars(HttpToolsProtocol)) == before
    assert "uvicorn 0.99.0" in caplog.text and "not applied" in caplog.text
