"""The client side of a scenario: a steady submit load, probes of every kind of endpoint, and the
record of each request (when it started, how long its answer took, what the answer was)."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from bench.httpclient import HTTPClientError, LeanClient

# Client-side bound of one request: long enough to see the "held until Postgres returns" case.
REQUEST_TIMEOUT_S = 40.0


@dataclass
class Answer:
    kind: str
    started: float  # epoch seconds
    elapsed_s: float
    status: int | None  # None: no HTTP answer (connection refused or closed, or the timeout)
    error: str = ""


@dataclass
class Accepted:
    result_id: str
    accepted_at: float  # epoch seconds of the 2xx answer


@dataclass
class LoadRecord:
    answers: list[Answer] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    submitted: int = 0
    last_submit_at: float = 0.0


async def timed(
    client: LeanClient,
    record: LoadRecord,
    kind: str,
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
) -> tuple[int | None, Any]:
    """One request, recorded; returns (status, parsed JSON body or None)."""
    started = time.time()
    t0 = time.monotonic()
    try:
        raw = None if body is None else _json(body)
        reply = await client.request(method, url, raw)
    except HTTPClientError as exc:
        record.answers.append(Answer(kind, started, time.monotonic() - t0, None, str(exc)[:200]))
        return None, None
    record.answers.append(Answer(kind, started, time.monotonic() - t0, reply.status_code))
    try:
        return reply.status_code, reply.json()
    except ValueError:
        return reply.status_code, None


def _json(body: dict[str, Any]) -> bytes:
    import json

    return json.dumps(body, separators=(",", ":")).encode()


async def make_contexts(client: LeanClient, n: int) -> list[str]:
    out: list[str] = []
    for k in range(n):
        reply = await client.post("/contexts/", {"content": f"Fault suite prompt {k}: tell a long story."})
        if reply.status_code != 201:
            raise RuntimeError(f"POST /contexts/ answered {reply.status_code}: {reply.text[:300]}")
        out.append(str(reply.json()["id"]))
    return out


async def submit_load(
    client: LeanClient,
    record: LoadRecord,
    *,
    model: str,
    contexts: list[str],
    jobs: int,
    rate_per_s: float,
    params: dict[str, Any],
) -> None:
    """`jobs` submits at a steady rate, each its own task: a slow answer never slows the rate."""
    tasks: list[asyncio.Task[None]] = []
    t0 = time.monotonic()
    ctx = itertools.cycle(contexts)

    async def one(context_id: str) -> None:
        status, body = await timed(
            client, record, "submit", "POST", f"/models/send/{model}/{context_id}", params
        )
        if status is not None and 200 <= status < 300 and isinstance(body, dict):
            rid = body.get("result_id") or body.get("id")
            if rid:
                record.accepted.append(Accepted(str(rid), time.time()))

    for k in range(jobs):
        delay = t0 + k / rate_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        record.submitted += 1
        record.last_submit_at = time.time()
        tasks.append(asyncio.create_task(one(next(ctx))))
    await asyncio.gather(*tasks)


async def probe(
    user: LeanClient,
    admin: LeanClient,
    record: LoadRecord,
    *,
    context_id: str,
    result_id: str,
    model: str,
    until: float,
    every_s: float = 0.1,
) -> None:
    """Every kind of endpoint in turn until `until` (epoch), each request its own task."""
    probes: list[tuple[LeanClient, str, str, str, dict[str, Any] | None]] = [
        (user, "GET /results/{id}", "GET", f"/results/{result_id}", None),
        (user, "POST /models/send", "POST", f"/models/send/{model}/{context_id}", {"max_tokens": 1}),
        (user, "GET /results/", "GET", "/results/?limit=5", None),
        (user, "POST /contexts/", "POST", "/contexts/", {"content": "probe"}),
        (user, "GET /contexts/{id}", "GET", f"/contexts/{context_id}", None),
        (user, "GET /contexts/", "GET", "/contexts/?limit=5", None),
        (user, "GET /results/{id}?wait", "GET", f"/results/{result_id}?wait=1", None),
        (user, "GET /models/", "GET", "/models/", None),
        (admin, "GET /admin/keys", "GET", "/admin/keys", None),
        (user, "GET /health", "GET", "/health", None),
        (user, "GET /health/ready", "GET", "/health/ready", None),
    ]
    tasks: list[asyncio.Task[tuple[int | None, Any]]] = []
    for client, kind, method, url, body in itertools.cycle(probes):
        if time.time() >= until:
            break
        tasks.append(asyncio.create_task(timed(client, record, kind, method, url, body)))
        await asyncio.sleep(every_s)
    await asyncio.gather(*tasks)


def lean(base_url: str, key: str) -> LeanClient:
    # A pool larger than the requests ever in flight: a request's time is the server's, not a wait
    # for a free connection in the client.
    return LeanClient(base_url, pool_size=2048, timeout_s=REQUEST_TIMEOUT_S, api_key=key)
