"""Fuzzing a real API server process over raw HTTP/1.1: at least 10,000 generated requests (methods,
paths, ids, query strings, headers, keys, bodies: broken, deeply nested, with NUL characters, over
the limit, chunked) and every one gets a complete HTTP answer that is not a 5xx. `FUZZ_REQUESTS`
scales the run; `FUZZ_SEED` replays one."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from devstack.processes import api_process, free_port

from tests.conftest import ADMIN_KEY, E2E_DB, FAST_MODEL, PG_BASE, bearer
from tests.db_utils import recreate_database

REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "10000"))
CONNECTIONS = 8
ANSWER_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def fuzz_api(e2e_env: dict[str, str], logs_dir: Path) -> Iterator[dict[str, Any]]:
    queue = e2e_env["CELERY_QUEUE"] + "-fuzz"  # nobody consumes it: the jobs only need to be accepted
    env = {
        **e2e_env,
        "DATABASE_URL": recreate_database(PG_BASE, f"{E2E_DB}_fuzz"),
        "CELERY_QUEUE": queue,
        "MAX_PENDING_PER_TENANT": "1000000",
        "SUBMIT_RATE_PER_KEY": "100000",
    }
    port = free_port()
    proc = api_process(env, logs_dir / "fuzz-api.log", port=port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_for_http(f"{url}/health", timeout_s=30)
        with httpx.Client(base_url=url, timeout=30, headers=bearer(ADMIN_KEY)) as admin:
            key = admin.post("/admin/keys", json={"tenant": "fuzz", "name": "fuzz"}).json()["key"]
            context = admin.post("/contexts/", json={"content": "fuzz me"}).json()["id"]
            result = admin.post(f"/models/send/{FAST_MODEL}/{context}", json={"max_tokens": 2}).json()[
                "result_id"
            ]
        yield {"port": port, "user_key": key, "context": context, "result": result, "log": proc.log_path}
    finally:
        proc.stop()
        redis.Redis.from_url(e2e_env["REDIS_URL"]).delete(queue)


# ---------------------------------------------------------------- the generator


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes | None
    chunked: bool = False

    def encode(self) -> bytes:
        # As clients send it: anything but printable ASCII percent-encoded (NUL included).
        target = quote(self.target, safe="/?&=%:;@!$'()*+,~-._")
        lines = [f"{self.method} {target} HTTP/1.1", "Host: fuzz"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
        elif self.body is not None:
            lines.append(f"Content-Length: {len(self.body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not self.chunked:
            return head + (self.body or b"")
        body, out = self.body or b"", [head]
        for i in range(0, len(body), 8192):
            piece = body[i : i + 8192]
            out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        out.append(b"0\r\n\r\n")
        return b"".join(out)


WEIRD = [
    "",
    " ",
    "null",
    "0",
    "-1",
    "1e309",
    "NaN",
    "true",
    "\x00",
    "a\x00b",
    "é",
    "😀",
    "%00",
    "%ff",
    "..",
    "x" * 300,
]


class Generator:
    def __init__(self, rng: random.Random, known: dict[str, str]) -> None:
        self.rng = rng
        self.known = known

    def pick(self, *options: Any) -> Any:
        return self.rng.choice(options)

    def ident(self) -> str:
        return self.pick(
            self.known["context"],
            self.known["result"],
            str(uuid.uuid4()),
            "not-a-uuid",
            "0" * 36,
            "%20",
            "😀",
            "a" * 500,
        )

    def text(self) -> Any:
        return self.pick(
            "hello",
            "",
            "\x00",
            "a\x00b",
            "é😀",
            "x" * self.rng.randint(0, 5000),
            self.rng.randint(-(2**70), 2**70),
            None,
            [],
            {},
        )

    def nested(self) -> bytes:
        depth = self.pick(10, 1000, 100_000)
        return (
            b"[" * depth + b"]" * depth if self.rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth
        )

    def send_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, values in (
            ("max_tokens", (1, 2, 0, -5, 10**9, "3", None, 2.5)),
            ("temperature", (0, 1.5, 3, -1, "hot", None)),
            ("top_p", (0, 0.5, 1, 2, None)),
            ("stop", ("x", ["a", "b"], "\x00", ["\x00"], ["s"] * 20, [1, 2], "", [""])),
            ("seed", (1, -1, 2**80, "s")),
            ("chat", (True, False, "yes")),
            ("ignore_eos", (True, False, 1)),
            ("stream", (True, False)),
            ("timeout_s", (1, 0, -1, 10**12, "x")),
            ("unknown", (1, "x")),
        ):
            if self.rng.random() < 0.3:
                params[name] = self.rng.choice(values)
        params["max_tokens"] = params.get("max_tokens", 2)
        return params

    def body(self, path: str) -> tuple[bytes | None, str | None]:
        roll = self.rng.random()
        if roll < 0.08:
            return self.nested(), "application/json"
        if roll < 0.14:
            return bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 300))), self.pick(
                "application/json", "text/plain", "application/octet-stream", None
            )
        if roll < 0.20:
            return b'{"content": "unterminated', "application/json"
        if roll < 0.24:
            return json.dumps(
                {"content": "y" * self.rng.choice((5000, 200_000))}
            ).encode(), "application/json"
        if path.startswith("/models/send"):
            return json.dumps(self.send_params()).encode(), self.pick(
                "application/json", "application/json; charset=utf-8", "text/plain"
            )
        if path.startswith("/contexts"):
            return json.dumps({"content": self.text()}).encode(), "application/json"
        if path.startswith("/admin/keys"):
            doc = {
                "tenant": self.pick("t1", "", "bad tenant!", "é", "x" * 100),
                "name": self.text(),
                "scope": self.pick("user", "admin", "root"),
            }
            return json.dumps(doc).encode(), "application/json"
        if "/limits" in path:
            return json.dumps(
                {
                    "max_pending": self.pick(1, 0, -1, None, "x"),
                    "submit_rate_per_s": self.pick(1, None, 10**20),
                }
            ).encode(), "application/json"
        if path.startswith("/v1/"):
            doc = {
                "model": self.pick(FAST_MODEL, "nope", 1),
                "messages": self.pick([{"role": "user", "content": "hi"}], [], "x", [{"role": 5}]),
                "prompt": self.text(),
                "max_tokens": self.pick(1, 2, -1),
                "n": self.pick(1, 2, 0, 1000),
            }
            return json.dumps(doc).encode(), "application/json"
        return json.dumps({"x": self.text()}).encode(), "application/json"

    def path(self) -> str:
        ident = self.ident
        return self.pick(
            "/contexts/",
            f"/contexts/{ident()}",
            "/models/",
            f"/models/send/{self.pick(FAST_MODEL, 'sim-llm-unloaded', 'nope', '%00', 'x' * 300)}/{ident()}",
            "/results/",
            f"/results/{ident()}",
            f"/results/{ident()}/cancel",
            "/admin/keys",
            f"/admin/keys/{ident()}",
            f"/admin/tenants/{self.pick('t1', '%20', 'é', 'x' * 100)}/limits",
            "/health",
            "/health/ready",
            "/v1/models",
            "/v1/chat/completions",
            "/v1/completions",
            "/openapi.json",
            "/" + "/".join(self.rng.choice(WEIRD).replace(" ", "%20") for _ in range(self.rng.randint(1, 4))),
        )

    def query(self) -> str:
        if self.rng.random() < 0.5:
            return ""
        pairs = []
        for _ in range(self.rng.randint(1, 4)):
            name = self.pick("limit", "cursor", "status", "model", "context_id", "tenant", "wait", "x")
            value = self.pick(
                "1", "0", "-1", "500", "abc", "pending", "0.1", "61", "1e9", "%00", "%ff", "x" * 300, ""
            )
            pairs.append(f"{name}={value}")
        return "?" + "&".join(pairs)

    def operation(self) -> tuple[str, str]:
        """Mostly an operation the API has, else any method on any path."""
        if self.rng.random() < 0.2:
            return self.pick("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"), self.path()
        ident = self.ident
        return self.pick(
            ("POST", "/contexts/"),
            ("GET", "/contexts/"),
            ("GET", f"/contexts/{ident()}"),
            (
                "POST",
                f"/models/send/{self.pick(FAST_MODEL, FAST_MODEL, 'sim-llm-unloaded', 'nope')}/{ident()}",
            ),
            ("POST", f"/models/send/{FAST_MODEL}/{self.known['context']}"),
            ("POST", f"/models/send/{FAST_MODEL}/{self.known['context']}"),
            ("GET", f"/results/{ident()}"),
            ("GET", f"/results/{self.known['result']}"),
            ("GET", "/results/"),
            ("POST", f"/results/{ident()}/cancel"),
            ("GET", "/models/"),
            ("POST", "/admin/keys"),
            ("GET", "/admin/keys"),
            ("DELETE", f"/admin/keys/{ident()}"),
            ("PUT", f"/admin/tenants/{self.pick('t1', 'é', 'x' * 100)}/limits"),
            ("GET", "/health/ready"),
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
        )

    def request(self) -> Request:
        method, path = self.operation()
        headers: list[tuple[str, str]] = []
        auth = self.rng.random()
        if auth < 0.45:
            headers.append(("Authorization", f"Bearer {self.known['user_key']}"))
        elif auth < 0.8:
            headers.append(("Authorization", f"Bearer {ADMIN_KEY}"))
        elif auth < 0.9:
            headers.append(
                (
                    "Authorization",
                    self.pick(
                        "Bearer",
                        "Basic abc",
                        "Bearer llmq_" + "z" * 40,
                        "Bearer x",
                        "bearer  " + "é".encode().decode("latin-1"),
                    ),
                )
            )
        if self.rng.random() < 0.1:
            headers.append(
                ("Idempotency-Key", self.pick("k1", "k2", "x" * 500, "é".encode().decode("latin-1")))
            )
        if self.rng.random() < 0.1:
            headers.append(
                ("Prefer", self.pick("wait=0.1", "wait=100", "wait=abc", "respond-async", "wait=0"))
            )
        body: bytes | None = None
        chunked = False
        if method in ("POST", "PUT", "PATCH") or self.rng.random() < 0.05:
            body, content_type = self.body(path)
            if content_type is not None:
                headers.append(("Content-Type", content_type))
            chunked = self.rng.random() < 0.15
        return Request(method, path + self.query(), headers, body, chunked)


# ---------------------------------------------------------------- the client


class NoAnswer(Exception):
    pass


async def read_response(reader: asyncio.StreamReader, method: str) -> tuple[int, dict[str, str], bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise NoAnswer(f"connection closed without an HTTP answer (got {exc.partial[:100]!r})") from exc
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    if method == "HEAD" or status in (204, 304):
        return status, headers, b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, headers, bytes(body)
            body += await reader.readexactly(size + 2)
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


async def drive(port: int, requests: list[Request], failures: list[str], statuses: Counter[int]) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    previous = "none"
    for request in requests:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert reader is not None
        try:
            writer.write(request.encode())
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server may answer (and close) before the whole body is sent: read its answer
        try:
            status, headers, body = await asyncio.wait_for(
                read_response(reader, request.method), ANSWER_TIMEOUT_S
            )
        except (NoAnswer, TimeoutError, ConnectionError) as exc:
            failures.append(
                f"{request.method} {request.target[:120]} (chunked={request.chunked}, body {len(request.body or b'')} B,"
                f" after {previous}): {type(exc).__name__}: {exc}"
            )
            writer.close()
            reader, writer, previous = None, None, "none"
            continue
        statuses[status] += 1
        previous = f"{request.method} {request.target[:60]} -> {status}"
        if status >= 500:
            failures.append(f"{request.method} {request.target[:120]} -> {status}: {body[:300]!r}")
        if headers.get("connection", "").lower() == "close" or request.chunked or status in (400, 413):
            writer.close()  # a fresh connection: the server may not have read all of this one's body
            reader, writer, previous = None, None, "none"
    if writer is not None:
        writer.close()


def test_ten_thousand_generated_requests_each_get_an_answer_and_none_a_5xx(fuzz_api: dict[str, Any]) -> None:
    seed = int(os.environ.get("FUZZ_SEED", str(random.randrange(2**32))))
    generator = Generator(random.Random(seed), {k: fuzz_api[k] for k in ("context", "result", "user_key")})
    requests = [generator.request() for _ in range(REQUESTS)]
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    started = time.monotonic()

    async def run() -> None:
        shares = [requests[i::CONNECTIONS] for i in range(CONNECTIONS)]
        await asyncio.gather(*(drive(fuzz_api["port"], share, failures, statuses) for share in shares))

    asyncio.run(run())
    elapsed = time.monotonic() - started
    print(f"fuzz: {REQUESTS} requests in {elapsed:.1f}s (seed {seed}): {dict(sorted(statuses.items()))}")
    assert not failures, f"seed {seed}: {len(failures)} failures, first: {failures[:10]}"
    assert sum(statuses.values()) == REQUESTS
    assert len(statuses) >= 6  # the generator reaches many answers (2xx, 401, 403, 404, 405, 413, 422...)
    assert "Traceback" not in fuzz_api["log"].read_text(errors="replace")
