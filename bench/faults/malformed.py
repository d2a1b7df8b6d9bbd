"""Malformed requests, written as raw bytes on a socket (no HTTP library tidies them up): garbage
bodies, huge and deeply nested JSON, NUL characters, bad headers, chunked bodies (valid, huge,
broken). What counts is that each gets an HTTP answer, and none a 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from bench.faults.load import Answer, LoadRecord

ANSWER_TIMEOUT_S = 30.0
HUGE = 2 * 1024 * 1024  # over any body limit the API has


@dataclass(frozen=True)
class Malformed:
    name: str
    head: bytes  # request line + headers, up to and including the blank line
    body: Callable[[], AsyncIterator[bytes]]


def _once(data: bytes) -> Callable[[], AsyncIterator[bytes]]:
    async def gen() -> AsyncIterator[bytes]:
        yield data

    return gen


def _chunked(parts: list[bytes], end: bytes = b"0\r\n\r\n") -> Callable[[], AsyncIterator[bytes]]:
    async def gen() -> AsyncIterator[bytes]:
        for part in parts:
            yield b"%x\r\n%s\r\n" % (len(part), part)
        yield end

    return gen


def _huge_chunked() -> Callable[[], AsyncIterator[bytes]]:
    async def gen() -> AsyncIterator[bytes]:
        piece = b'{"content": "' + b"x" * (64 * 1024 - 13)
        for _ in range(HUGE // len(piece) + 1):
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"0\r\n\r\n"

    return gen


def catalogue(host: str, key: str, model: str, context_id: str) -> list[Malformed]:
    auth = f"Authorization: Bearer {key}\r\n".encode()
    send = f"/models/send/{model}/{context_id}".encode()

    def req(
        path: bytes, body: bytes, *, method: bytes = b"POST", extra: bytes = b"", with_auth: bool = True
    ) -> bytes:
        return (
            method + b" " + path + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + (auth if with_auth else b"")
            + b"Content-Type: application/json\r\n" + extra + b"Content-Length: " + str(len(body)).encode()
            + b"\r\n\r\n"
        )  # fmt: skip

    def fixed(name: str, path: bytes, body: bytes, **kw: object) -> Malformed:
        return Malformed(name, req(path, body, **kw), _once(body))  # type: ignore[arg-type]

    def chunked_head(path: bytes) -> bytes:
        return (
            b"POST " + path + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + auth
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )  # fmt: skip

    nested = b"[" * 100_000 + b"]" * 100_000
    nested_obj = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    huge = json.dumps({"content": "y" * HUGE}).encode()
    return [
        fixed("garbage body", send, b"\x00\xff\xfe garbage {{{ not json"),
        fixed("invalid UTF-8", b"/contexts/", b'{"content": "\xff\xfe\xfd"}'),
        fixed("truncated JSON", send, b'{"max_tokens": 5, "stop": ["a"'),
        fixed("JSON of the wrong type", send, b"[1, 2, 3]"),
        fixed("wrong field types", send, b'{"max_tokens": "many", "temperature": [], "seed": {}}'),
        fixed("deeply nested send body", send, nested),
        fixed("deeply nested object", send, nested_obj),
        fixed("deeply nested context", b"/contexts/", b'{"content": ' + nested + b"}"),
        fixed("huge JSON body", b"/contexts/", huge),
        fixed("NUL in stop", send, b'{"max_tokens": 4, "stop": ["a\\u0000b"]}'),
        fixed("NUL in content", b"/contexts/", b'{"content": "a\\u0000b"}'),
        fixed("lone surrogate", b"/contexts/", b'{"content": "\\ud800"}'),
        fixed("huge numbers", send, b'{"max_tokens": 1e999, "seed": 123456789012345678901234567890}'),
        fixed("bad UUID in path", f"/models/send/{model}/not-a-uuid".encode(), b"{}"),
        fixed("path with NUL", b"/results/%00", b"", method=b"GET"),
        fixed("very long URL", b"/results/" + b"a" * 60_000, b"", method=b"GET"),
        fixed("no Authorization", send, b"{}", with_auth=False),
        fixed(
            "NUL in Authorization",
            send,
            b"{}",
            with_auth=False,
            extra=b"Authorization: Bearer llmq_\x00abc\r\n",
        ),
        fixed(
            "non-ASCII Authorization",
            send,
            b"{}",
            with_auth=False,
            extra="Authorization: Bearer llmq_é€\r\n".encode(),
        ),
        fixed("huge header", send, b"{}", extra=b"X-Big: " + b"h" * 200_000 + b"\r\n"),
        fixed("bad Content-Type", send, b"{}", extra=b"Content-Type: text/plain; charset=\x01\r\n"),
        fixed("unknown method", b"/contexts/", b"{}", method=b"BREW"),
        Malformed(
            "Content-Length not a number",
            b"POST /contexts/ HTTP/1.1\r\nHost: "
            + host.encode()
            + b"\r\n"
            + auth
            + b"Content-Length: ten\r\n\r\n",
            _once(b""),
        ),
        Malformed(
            "Content-Length and chunked",
            b"POST /contexts/ HTTP/1.1\r\nHost: "
            + host.encode()
            + b"\r\n"
            + auth
            + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            _chunked([b'{"content": "both"}']),
        ),
        Malformed(
            "chunked valid body", chunked_head(b"/contexts/"), _chunked([b'{"content": ', b'"chunked"}'])
        ),
        Malformed("chunked send body", chunked_head(send), _chunked([b'{"max_tokens"', b": 2}"])),
        Malformed("chunked huge body", chunked_head(b"/contexts/"), _huge_chunked()),
        Malformed("chunked bad size", chunked_head(b"/contexts/"), _once(b"zz\r\nabc\r\n0\r\n\r\n")),
        Malformed(
            "chunked nested",
            chunked_head(send),
            _chunked([nested[i : i + 8192] for i in range(0, len(nested), 8192)]),
        ),
    ]


async def send_raw(host: str, port: int, item: Malformed) -> tuple[int | None, str]:
    """(status, error): writes the request, then reads the status line even if the server stopped
    reading (and closed) before the body was all sent."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:

        async def write() -> None:
            writer.write(item.head)
            async for part in item.body():
                writer.write(part)
                await writer.drain()
            await writer.drain()

        write_error = ""
        try:
            await asyncio.wait_for(write(), ANSWER_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            write_error = f"while sending: {type(exc).__name__}"
        try:
            line = await asyncio.wait_for(reader.readline(), ANSWER_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            return None, f"no answer ({type(exc).__name__}) {write_error}".strip()
        if not line.startswith(b"HTTP/"):
            return None, f"no answer (connection closed) {write_error}".strip()
        return int(line.split()[1]), ""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2.0)


async def malformed_load(
    host: str, port: int, items: list[Malformed], record: LoadRecord, *, until: float, every_s: float
) -> None:
    """The catalogue in turn until `until` (epoch), a few at a time."""
    slots = asyncio.Semaphore(4)

    async def one(item: Malformed) -> None:
        async with slots:
            started = time.time()
            t0 = time.monotonic()
            try:
                status, error = await send_raw(host, port, item)
            except OSError as exc:
                status, error = None, f"connect: {type(exc).__name__}: {exc}"
            record.answers.append(
                Answer(f"malformed: {item.name}", started, time.monotonic() - t0, status, error)
            )

    tasks = []
    for item in itertools.cycle(items):
        if time.time() >= until:
            break
        tasks.append(asyncio.create_task(one(item)))
        await asyncio.sleep(every_s)
    await asyncio.gather(*tasks)
