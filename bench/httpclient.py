"""A lean asyncio HTTP/1.1 keep-alive client: the benchmark's default load generator.

httpx costs ~5 ms of CPU per request on this machine (a third of the 2 cores at the benchmark's load),
and the client is not the system under test. This one does the minimum: a pool of
``asyncio.open_connection`` streams (at most ``pool_size`` open, one request at a time on each),
requests written as raw bytes with ``Content-Length``, responses read as status line + headers +
``Content-Length`` body (``Transfer-Encoding: chunked`` is understood too), and an event stream line
by line as it arrives (``lines``: the streaming probes, which time its first piece).

Correctness rules: a connection goes back to the pool only after a complete response that did not say
``Connection: close``; a connection interrupted mid-request (timeout, cancellation, error) is closed,
never reused; a request that fails on a *reused* keep-alive connection before any byte of the answer
arrived (the server closed it while idle, e.g. uvicorn's 5 s keep-alive timeout) is retried once on a
new connection — the server never saw it. Errors are raised as :class:`HTTPClientError` (never a bare
``TimeoutError``, which the benchmark reserves for its phase deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import urlsplit


class HTTPClientError(Exception):
    """Connection failure, timeout or malformed response."""


class Reply:
    __slots__ = ("body", "headers", "status_code")

    def __init__(self, status_code: int, body: bytes, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.body = body
        self.headers = headers

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class _Conn:
    __slots__ = ("reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = False  # has completed at least one request (a stale keep-alive is possible)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _NothingReceived(Exception):
    """The connection failed before any byte of the response arrived."""


class LeanClient:
    errors: tuple[type[BaseException], ...] = (HTTPClientError,)

    def __init__(
        self, base_url: str, pool_size: int, timeout_s: float = 60.0, api_key: str | None = None
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// is supported, not {base_url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self._host_header = f"{self.host}:{self.port}".encode()
        self._auth = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(pool_size)
        self._open: set[_Conn] = set()
        self.connects = 0  # connections opened (reported: should stay ≈ pool size with keep-alive)
        self.retries = 0

    async def post(self, url: str, body: dict[str, Any]) -> Reply:
        return await self.request("POST", url, json.dumps(body, separators=(",", ":")).encode())

    async def get(self, url: str) -> Reply:
        return await self.request("GET", url, None)

    def _raw(self, method: str, url: str, body: bytes | None) -> bytes:
        head = [
            f"{method} {self.prefix}{url} HTTP/1.1\r\n".encode(),
            b"Host: ",
            self._host_header,
            b"\r\n",
            self._auth,
        ]
        if body is not None:
            head += [b"Content-Type: application/json\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        head.append(b"\r\n")
        if body is not None:
            head.append(body)
        return b"".join(head)

    async def lines(self, method: str, url: str, body: dict[str, Any] | None = None) -> AsyncGenerator[str]:
        """A response's body line by line as it arrives (an event stream), for a 200 answer; another
        status is an HTTPClientError. Its connection is kept only if the body was read to its end."""
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        raw = self._raw(method, url, data)
        async with self._slots:
            conn: _Conn | None = None
            complete = False
            try:
                for attempt in (0, 1):
                    conn = await self._checkout()
                    reused = conn.used
                    try:
                        status, headers, keep = await self._head(conn, raw)
                        break
                    except _NothingReceived:
                        self._discard(conn)
                        conn = None
                        if reused and attempt == 0:
                            self.retries += 1
                            continue
                        raise HTTPClientError(f"{method} {url}: connection closed") from None
                assert conn is not None
                if status != 200:
                    raise HTTPClientError(f"{method} {url}: HTTP {status}")
                if headers.get("transfer-encoding", "").lower() != "chunked":
                    raise HTTPClientError(f"{method} {url}: not a chunked stream")
                pending = b""
                async for chunk in self._chunks(conn.reader):
                    pending += chunk
                    *done, pending = pending.split(b"\n")
                    for line in done:
                        yield line.rstrip(b"\r").decode("utf-8", "replace")
                if pending:
                    yield pending.decode("utf-8", "replace")
                complete = keep
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                raise HTTPClientError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
            finally:
                if conn is not None:
                    if complete:
                        conn.used = True
                        self._idle.append(conn)
                    else:
                        self._discard(conn)  # left mid-stream: the connection's state is unknown

    async def request(self, method: str, url: str, body: bytes | None) -> Reply:
        raw = self._raw(method, url, body)
        async with self._slots:
            try:
                async with asyncio.timeout(self.timeout_s):
                    for attempt in (0, 1):
                        conn = await self._checkout()
                        reused = conn.used
                        try:
                            reply, keep = await self._exchange(conn, raw)
                        except _NothingReceived as exc:
                            self._discard(conn)
                            if reused and attempt == 0:
                                self.retries += 1
                                continue  # stale keep-alive connection: the server never saw it
                            raise HTTPClientError(
                                f"{method} {url}: connection closed ({exc.__cause__!r})"
                            ) from None
                        except BaseException:
                            self._discard(conn)  # mid-response: the connection's state is unknown
                            raise
                        if keep:
                            conn.used = True
                            self._idle.append(conn)
                        else:
                            self._discard(conn)
                        return reply
                    raise AssertionError("unreachable")
            except TimeoutError:
                raise HTTPClientError(f"{method} {url}: no answer within {self.timeout_s} s") from None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                raise HTTPClientError(f"{method} {url}: {type(exc).__name__}: {exc}") from None

    async def _checkout(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            self._discard(conn)
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.connects += 1
        conn = _Conn(reader, writer)
        self._open.add(conn)
        return conn

    def _discard(self, conn: _Conn) -> None:
        self._open.discard(conn)
        conn.close()

    @staticmethod
    async def _head(conn: _Conn, raw: bytes) -> tuple[int, dict[str, str], bool]:
        """Send the request; the answer's status, headers and whether the connection may be kept."""
        reader = conn.reader
        try:
            conn.writer.write(raw)
            await conn.writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                raise
            raise _NothingReceived from exc
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status = int(rest[:3])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1"
        connection = headers.get("connection", "").lower()
        if connection == "close":
            keep = False
        elif connection == "keep-alive":
            keep = True
        return status, headers, keep

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """A chunked body's chunks as they arrive (trailers read and dropped)."""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)

    @classmethod
    async def _exchange(cls, conn: _Conn, raw: bytes) -> tuple[Reply, bool]:
        status, headers, keep = await cls._head(conn, raw)
        reader = conn.reader
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b"".join([chunk async for chunk in cls._chunks(reader)])
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body = await reader.readexactly(length) if length else b""
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:  # body delimited by the end of the connection
            body = await reader.read()
            keep = False
        return Reply(status, body, headers), keep

    async def __aenter__(self) -> LeanClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        conns = list(self._open)
        self._open.clear()
        self._idle.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.writer.wait_closed(), 1.0)
