"""Bodies over the limit are answered 413 with the JSON message, to ordinary clients that are still
sending (urllib, raw sockets, chunked uploads), through the real server."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from app.http_protocol import LINGER_BYTES


def test_urllib_client_receives_the_413_for_a_body_of_several_mib(api_server: str) -> None:
    body = b'{"content": "' + b"x" * (8 * 1024 * 1024) + b'"}'
    request = urllib.request.Request(
        f"{api_server}/contexts/", data=body, headers={"content-type": "application/json"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    message = json.loads(refused.value.read())
    assert f"request body is {len(body)} bytes; the limit is" in message["error"]


def _raw_request(api_server: str, head: bytes, chunks: list[bytes]) -> bytes:
    url = urlsplit(api_server)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        answer = b""
        while data := sock.recv(65536):
            answer += data
        return answer


def test_a_chunked_body_is_bounded_while_it_is_read(api_server: str) -> None:
    piece = b'{"content": "' + b"y" * (1024 * 1024)
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 6 + [b"0\r\n\r\n"]
    head = (
        b"POST /contexts/ HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    answer = _raw_request(api_server, head, chunks)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", answer[:300]
    assert b'"request body is over ' in rest


def test_a_request_the_parser_refuses_gets_its_400_while_the_client_still_sends(api_server: str) -> None:
    # uvicorn refuses Content-Length with chunked at the headers; the client goes on sending its
    # body. Closed at once, the server's socket would reset the connection and take the 400 with it.
    url = urlsplit(api_server)
    head = (
        b"POST /contexts/ HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    piece = b"z" * 65536
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head)
        time.sleep(0.3)  # the answer is out, and uvicorn would have closed by now
        for _ in range(15):  # ~1 MB more, chunk framing included: within what the server drops
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        assert 15 * (len(piece) + 9) + 5 < LINGER_BYTES  # past it the server closes: a reset may follow
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 400 Bad Request", answer[:300]
    assert rest.endswith(b"Invalid HTTP request received.")


def test_a_form_body_is_a_415_saying_the_body_must_be_json(api_server: str) -> None:
    # What `curl -d '{...}'` and `requests.post(data=...)` send: a valid JSON text labelled as a form.
    request = urllib.request.Request(
        f"{api_server}/contexts/", data=b'{"content": "hi"}', method="POST"
    )  # urllib labels it application/x-www-form-urlencoded
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 415
    message = json.loads(refused.value.read())["error"]
    assert "must be JSON, sent with Content-Type: application/json" in message
    assert "application/x-www-form-urlencoded" in message


def _answer_without_sending_the_body(api_server: str, head: bytes) -> bytes:
    """What the server answers a head with Expect: 100-continue, the body never sent: the answer,
    then the end of the connection."""
    url = urlsplit(api_server)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while data := sock.recv(65536):  # a server waiting for the body would time this out
            answer += data
        return answer


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        (b"content-type: application/json\r\ncontent-length: 100\r\n", 401, "missing API key"),
        (b"AUTH\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n", 413, "request body is"),
        (b"AUTH\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n", 415, "the request body must be JSON"),
    ],
    ids=["no-key", "too-large", "not-json"],
)
def test_a_refusal_known_from_the_head_is_sent_instead_of_100_continue(
    api_server: str, e2e_user_key: str, headers: bytes, status: int, error: str
) -> None:
    headers = headers.replace(b"AUTH", b"authorization: Bearer " + e2e_user_key.encode())
    head = b"POST /contexts/ HTTP/1.1\r\nHost: x\r\nexpect: 100-continue\r\n" + headers + b"\r\n"
    answer = _answer_without_sending_the_body(api_server, head)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    head_fields, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in head_fields.lower()  # the body may still come: no next request
    assert json.loads(body)["error"].startswith(error)


def test_a_body_the_server_takes_is_asked_for_with_100_continue(api_server: str, e2e_user_key: str) -> None:
    url = urlsplit(api_server)
    body = b'{"content": "hi"}'
    head = (
        b"POST /contexts/ HTTP/1.1\r\nHost: x\r\nexpect: 100-continue\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n" % (e2e_user_key.encode(), len(body))
    )
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 201 ")


def test_two_content_types_are_a_400_whichever_comes_first(api_server: str, e2e_user_key: str) -> None:
    for first, second in [(b"text/plain", b"application/json"), (b"application/json", b"text/plain")]:
        body = b'{"content": "hi"}'
        head = (
            b"POST /contexts/ HTTP/1.1\r\nHost: x\r\ncontent-type: %s\r\ncontent-type: %s\r\n"
            b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n"
            % (first, second, e2e_user_key.encode(), len(body))
        )
        answer = _raw_request(api_server, head, [body])
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 400 Bad Request", answer[:300]
        message = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert message["error"] == "the request has more than one Content-Type header: send one"


def test_a_head_without_end_is_a_431_not_a_growing_process(api_server: str) -> None:
    # The API's own process: header lines sent on and on are refused at 64 KiB, with the JSON error.
    url = urlsplit(api_server)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Pad: " + b"a" * 4000 + b"\r\n"
        try:
            for _ in range(100):
                sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:300]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"] == "the request head is over 65536 bytes"
