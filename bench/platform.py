"""Through the platform: N virtual clients on one shared HTTP client (default: the lean asyncio client of
``bench.httpclient``; ``--client httpx`` for comparison). Each submits a job
(POST /models/send/{model}/{context_id}), then waits for it with long polls (GET /results/{id}?wait=30,
default) or polls GET /results/{id} every interval, until it is completed or failed, then takes the next
job, until the total is done or the time limit hits."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench.httpclient import LeanClient, Reply
from bench.stats import RunResult
from bench.workload import PROMPTS, JobClock, Phase, Polling, Warmup, api_params


class HttpxClient:
    """The first round's load generator (``--client httpx``): one shared httpx.AsyncClient, connection
    limit above N. Kept to show what the client costs (~5 ms CPU per request here)."""

    errors: tuple[type[BaseException], ...] = (httpx.HTTPError,)

    def __init__(self, api_url: str, pool_size: int, api_key: str | None = None) -> None:
        limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.AsyncClient(
            base_url=api_url, limits=limits, timeout=httpx.Timeout(60.0), headers=headers
        )

    async def post(self, url: str, body: dict[str, Any]) -> Reply:
        r = await self._client.post(url, json=body)
        return Reply(r.status_code, r.content, {})

    async def get(self, url: str) -> Reply:
        r = await self._client.get(url)
        return Reply(r.status_code, r.content, {})

    async def __aenter__(self) -> HttpxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()


Client = LeanClient | HttpxClient
CLIENTS = ("lean", "httpx")


def make_client(api_url: str, in_flight: int, kind: str = "lean", api_key: str | None = None) -> Client:
    """A pool of N + 8 keep-alive connections: every virtual client has its own, plus spares."""
    if kind == "httpx":
        return HttpxClient(api_url, in_flight + 8, api_key)
    if kind == "lean":
        return LeanClient(api_url, in_flight + 8, timeout_s=90.0, api_key=api_key)
    raise ValueError(f"unknown client {kind!r}; known: {CLIENTS}")


async def create_contexts(client: Client) -> list[str]:
    ids = []
    for prompt in PROMPTS:
        r = await client.post("/contexts/", {"content": prompt})
        if r.status_code != 201:
            raise RuntimeError(f"POST /contexts/: {r.status_code} {r.text}")
        ids.append(r.json()["id"])
    return ids


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


async def run_platform(
    client: Client,
    context_ids: list[str],
    phase: Phase,
    total: int,
    polling: Polling,
    warmup: Warmup | None = None,
) -> RunResult:
    """``polling.mode`` "long": after the submit, GET /results/{id}?wait=<long_poll_wait_s> until terminal
    (normally one request); "interval": sleep ``poll_interval_s``, GET /results/{id}, repeat.
    ``polling.probe_every`` K > 0: every K-th job also does one plain GET /results/{id} (no wait) right after it
    completed, to measure the latency of a poll under load (not counted in polls per job)."""
    poll_mode, poll_interval_s, probe_every = polling.mode, polling.interval_s, polling.probe_every
    long_poll_wait_s = polling.long_poll_wait_s
    result = RunResult("platform", phase.scenario, phase.model, phase.in_flight, total, poll_mode=poll_mode)
    result.ramp_s = phase.ramp_s
    clock = JobClock(total, warmup)
    long_poll = poll_mode == "long"
    poll_suffix = f"?wait={long_poll_wait_s:g}" if long_poll else ""

    async def one_job(i: int) -> None:
        """Job ``i`` < 0 is a warm-up job: only its submit latency is kept (``warmup_submit_latency_s``)."""
        job = phase.jobs[i % len(phase.jobs)]
        url = f"/models/send/{phase.model}/{context_ids[job.prompt_index]}"
        t0 = time.monotonic()
        r = await client.post(url, api_params(phase.max_tokens, job.seed))
        t1 = time.monotonic()
        if r.status_code != 202:
            result.note_error(f"POST {url}: {r.status_code} {r.text}")
            return
        (result.submit_latency_s if i >= 0 else result.warmup_submit_latency_s).append(t1 - t0)
        if i < 0:
            await _finish_warmup_job(r.json()["result_id"])
            return
        rid = r.json()["result_id"]
        poll_url = f"/results/{rid}{poll_suffix}"
        while True:
            if not long_poll:
                await asyncio.sleep(poll_interval_s)
            p0 = time.monotonic()
            g = await client.get(poll_url)
            p1 = time.monotonic()
            wall1 = time.time()
            result.polls += 1
            result.poll_latency_s.append(p1 - p0)
            if g.status_code != 200:
                result.note_error(f"GET {poll_url}: {g.status_code} {g.text}")
                return
            body = g.json()
            status = body["status"]
            if status == "pending":
                continue
            clock.last_done = p1
            clock.finished(p1)
            finished = _epoch(body.get("finished_at"))
            if finished is not None:
                result.answer_lag_s.append(max(wall1 - finished, 0.0))
            if status == "completed":
                result.jobs_completed += 1
                result.job_latency_s.append(p1 - t0)
                tokens = body.get("completion_tokens") or 0
                result.tokens += tokens
                if tokens != phase.max_tokens:
                    result.wrong_length += 1
            else:
                result.jobs_failed += 1
                result.note_error(f"job {rid} {status}: {body.get('error')}")
            break
        if probe_every and i % probe_every == 0:
            q0 = time.monotonic()
            q = await client.get(f"/results/{rid}")
            result.probe_latency_s.append(time.monotonic() - q0)
            if q.status_code != 200:
                result.note_error(f"GET /results/{rid} (probe): {q.status_code} {q.text}")

    async def _finish_warmup_job(rid: str) -> None:
        while True:
            g = await client.get(f"/results/{rid}{poll_suffix}")
            if g.status_code != 200 or g.json()["status"] != "pending":
                clock.finished(time.monotonic())
                return
            if not long_poll:
                await asyncio.sleep(poll_interval_s)

    await run_clients(phase, clock, result, client.errors, one_job)
    return result


async def run_clients(
    phase: Phase,
    clock: JobClock,
    result: RunResult,
    errors: tuple[type[BaseException], ...],
    one_job: Callable[[int], Awaitable[None]],
) -> None:
    """N virtual clients, each doing one job after another until the clock has none left or the phase's
    time limit; then the run's wall time and steady rate."""
    loop = asyncio.get_running_loop()
    deadline = clock.start + phase.time_limit_s

    async def virtual_client(k: int) -> None:
        try:
            async with asyncio.timeout_at(deadline - time.monotonic() + loop.time()):
                await phase.start_of(k)
                while True:
                    i = clock.take()  # < 0: a warm-up job
                    if i is None:
                        return
                    try:
                        await one_job(i)
                    except errors as exc:
                        result.note_error(f"{type(exc).__name__}: {exc}")
        except TimeoutError:
            result.timed_out = True

    await asyncio.gather(*(virtual_client(k) for k in range(phase.in_flight)))
    result.wall_s = clock.wall_s
    result.steady_jobs_per_s = clock.steady_jobs_per_s()
