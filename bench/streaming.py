"""Streaming probes, run beside a scenario's load in both modes: K clients that each stream one job
after another (time to first token, delay between pieces), and one that cancels a streamed job once
it is generating (time from the cancel request to the engine's abort counter rising).

direct: `TritonInference.generate(..., on_text=...)` (Triton's own streaming) and cancelling its task.
platform: `POST /models/send` with `"stream": true`, then `GET /results/{id}/stream` (SSE), and
`POST /results/{id}/cancel`; in the chat scenario `POST /v1/chat/completions` with `stream: true`
(no cancel: the OpenAI API has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.triton.inference import Aborted, GenerationError, TritonInference
from bench.httpclient import HTTPClientError, LeanClient, Reply
from bench.workload import Phase, api_params, triton_params

CANCEL_MAX_TOKENS = 400  # long enough to be running when the cancel comes
CANCEL_AFTER_PIECES = 3


async def think(phase: Phase, rng: random.Random) -> None:
    """A streaming client's pause before its next job. Back to back, a probe's job starts the moment
    its last one ends, in step with the load's own waves of ends and submits (see bench/README.md),
    so its first token measures where it lands in a wave; an interactive user comes at any moment."""
    if phase.probe_think_s > 0:
        await asyncio.sleep(rng.uniform(0, phase.probe_think_s))


@dataclass
class StreamProbes:
    ttft_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    cancel_s: list[float] = field(default_factory=list)
    cancel_answer_s: list[float] = field(default_factory=list)  # platform: the cancel request's own latency
    pieces: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(message[:300])


@dataclass
class _Timing:
    start: float
    last: float | None = None

    def piece(self, probes: StreamProbes) -> None:
        now = time.monotonic()
        if self.last is None:
            probes.ttft_s.append(now - self.start)
        else:
            probes.gaps_s.append(now - self.last)
        self.last = now
        probes.pieces += 1


# How often the abort counter is read while a cancel is awaited. The engine says when it dropped the
# sequence (its CLOCK_MONOTONIC, this machine's), so the reading need not be frequent; scraping
# Triton's metrics in a tight loop took CPU from the very processes that carry the cancel.
ABORT_POLL_S = 0.025


def abort_state(metrics: str, model: str) -> tuple[float, float | None]:
    """From Triton's metrics text: (sequences the engine aborted so far, CLOCK_MONOTONIC time of
    the latest abort, None when the engine does not say)."""
    count, at = 0.0, None
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == "sim_engine_cancelled_total":
                count = sample.value
            elif sample.name == "sim_engine_last_cancel_monotonic_seconds":
                at = sample.value
    return count, at


class AbortCounter:
    """The simulated engine's count of aborted sequences for one model, and when it dropped the
    latest (Triton's metrics)."""

    def __init__(self, metrics_url: str, model: str) -> None:
        self._url = metrics_url
        self._model = model
        self._http = httpx.AsyncClient(timeout=5)

    async def read(self) -> float:
        return (await self._read())[0]

    async def _read(self) -> tuple[float, float | None]:
        return abort_state((await self._http.get(self._url)).text, self._model)

    async def time_until_above(self, before: float, since: float, limit_s: float = 5.0) -> float | None:
        """From `since` (time.monotonic()) to the engine's next abort: its own time of the drop."""
        while time.monotonic() - since < limit_s:
            count, at = await self._read()
            if count > before:
                return at - since if at is not None and at >= since else time.monotonic() - since
            await asyncio.sleep(ABORT_POLL_S)
        return None

    async def close(self) -> None:
        await self._http.aclose()


async def _run_cancels(
    probes: StreamProbes,
    stop: asyncio.Event,
    counter: AbortCounter | None,
    one: Callable[[AbortCounter], Awaitable[None]],
) -> None:
    if counter is None:
        return
    while not stop.is_set():
        try:
            await one(counter)
        except Exception as exc:  # a probe error is reported, not fatal to the run
            probes.note(f"cancel probe: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)


async def direct_probes(
    grpc_url: str, phase: Phase, k: int, stop: asyncio.Event, metrics_url: str | None
) -> StreamProbes:
    probes = StreamProbes()
    client = TritonInference(grpc_url, connect_timeout_s=5.0, request_timeout_s=120.0)
    counter = AbortCounter(metrics_url, phase.model) if metrics_url else None
    tag = uuid.uuid4().hex[:8]
    seq = itertools.count()

    async def streamer(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            await think(phase, rng)
            job = phase.jobs[(i * 7 + next(seq)) % len(phase.jobs)]
            timing = _Timing(time.monotonic())
            try:
                gen = await client.generate(
                    phase.model,
                    job.prompt,
                    triton_params(phase.max_tokens, job.seed),
                    f"probe-{tag}-{next(seq)}",
                    on_text=lambda _t, timing=timing: timing.piece(probes),  # type: ignore[misc]
                )
                probes.tokens += gen.completion_tokens or 0
            except GenerationError as exc:
                probes.note(exc.message)

    async def cancel_one(counter: AbortCounter) -> None:
        job = phase.jobs[next(seq) % len(phase.jobs)]
        started = asyncio.Event()
        count = 0

        def on_text(_text: str) -> None:
            nonlocal count
            count += 1
            if count >= CANCEL_AFTER_PIECES:
                started.set()

        params = {**triton_params(CANCEL_MAX_TOKENS, job.seed), "ignore_eos": True}
        task = asyncio.ensure_future(
            client.generate(phase.model, job.prompt, params, f"probe-{tag}-c{next(seq)}", on_text=on_text)
        )
        await started.wait()
        before = await counter.read()
        t0 = time.monotonic()
        task.cancel()
        with contextlib.suppress(Aborted, asyncio.CancelledError):
            await task
        took = await counter.time_until_above(before, t0)
        if took is None:
            probes.note("direct cancel: the engine did not abort within 5 s")
        else:
            probes.cancel_s.append(took)

    try:
        await asyncio.gather(
            *(streamer(i) for i in range(k)), _run_cancels(probes, stop, counter, cancel_one)
        )
    finally:
        await client.close()
        if counter is not None:
            await counter.close()
    return probes


async def _events(http: LeanClient, result_id: str) -> AsyncGenerator[tuple[str, Any]]:
    """(event, data) of a result's SSE stream."""
    event = data = None
    async with contextlib.aclosing(http.lines("GET", f"/results/{result_id}/stream")) as lines:
        async for line in lines:
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif not line and event is not None:
                yield event, json.loads(data or "null")
                event = data = None


async def platform_probes(
    api_url: str,
    api_key: str | None,
    context_ids: list[str],
    phase: Phase,
    k: int,
    stop: asyncio.Event,
    metrics_url: str | None,
) -> StreamProbes:
    probes = StreamProbes()
    # The load's own lean client: the probes time the platform, not an HTTP library's CPU.
    http = LeanClient(api_url, pool_size=2 * k + 8, timeout_s=120, api_key=api_key)
    counter = AbortCounter(metrics_url, phase.model) if metrics_url else None
    seq = itertools.count()

    async def submit(max_tokens: int, seed: int, ignore_eos: bool = False) -> str:
        body = {**api_params(max_tokens, seed), "stream": True}
        if ignore_eos:
            body["ignore_eos"] = True
        ctx = context_ids[next(seq) % len(context_ids)]
        r = await http.post(f"/models/send/{phase.model}/{ctx}", body)
        if r.status_code != 202:
            raise RuntimeError(f"send: HTTP {r.status_code} {r.text[:200]}")
        return str(r.json()["result_id"])

    async def streamer(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            await think(phase, rng)
            job = phase.jobs[(i * 7 + next(seq)) % len(phase.jobs)]
            timing = _Timing(time.monotonic())
            try:
                result_id = await submit(phase.max_tokens, job.seed)
                async with contextlib.aclosing(_events(http, result_id)) as events:
                    async for event, data in events:
                        if event == "token":
                            timing.piece(probes)
                        elif event == "done":
                            probes.tokens += data.get("completion_tokens") or 0
            except (HTTPClientError, RuntimeError) as exc:
                probes.note(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)

    async def cancel_one(counter: AbortCounter) -> None:
        job = phase.jobs[next(seq) % len(phase.jobs)]
        result_id = await submit(CANCEL_MAX_TOKENS, job.seed, ignore_eos=True)
        pieces = 0
        async with contextlib.aclosing(_events(http, result_id)) as events:
            async for event, _data in events:
                pieces += event == "token"
                if pieces >= CANCEL_AFTER_PIECES or event == "done":
                    break
        before = await counter.read()
        t0 = time.monotonic()

        async def request() -> Reply:
            response = await http.request("POST", f"/results/{result_id}/cancel", None)
            probes.cancel_answer_s.append(time.monotonic() - t0)
            return response

        # The engine's abort is watched from the request's start: the answer may come after it (a
        # streamed job's answer waits for the text produced so far), and is timed on its own.
        post = asyncio.ensure_future(request())
        took = await counter.time_until_above(before, t0)
        r = await post
        if r.status_code != 200:
            raise RuntimeError(f"cancel: HTTP {r.status_code} {r.text[:200]}")
        if took is None:
            probes.note("platform cancel: the engine did not abort within 5 s")
        else:
            probes.cancel_s.append(took)

    try:
        await asyncio.gather(
            *(streamer(i) for i in range(k)), _run_cancels(probes, stop, counter, cancel_one)
        )
    finally:
        await http.aclose()
        if counter is not None:
            await counter.close()
    return probes


async def chat_probes(
    api_url: str, api_key: str | None, phase: Phase, k: int, stop: asyncio.Event
) -> StreamProbes:
    """The chat scenario's platform probes: K clients streaming `POST /v1/chat/completions`
    (`stream: true`) one conversation after another; a piece is a chunk with new content."""
    from bench.chat import ChatJob, chat_body  # bench.chat imports the load generator

    probes = StreamProbes()
    http = LeanClient(api_url, pool_size=k + 4, timeout_s=120, api_key=api_key)
    seq = itertools.count()

    async def streamer(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            await think(phase, rng)
            job = phase.jobs[(i * 7 + next(seq)) % len(phase.jobs)]
            assert isinstance(job, ChatJob)
            body = {**chat_body(phase, job), "stream": True, "stream_options": {"include_usage": True}}
            timing = _Timing(time.monotonic())
            try:
                async with contextlib.aclosing(http.lines("POST", "/v1/chat/completions", body)) as lines:
                    async for line in lines:
                        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                            continue
                        chunk = json.loads(line[5:])
                        if chunk.get("usage"):
                            probes.tokens += chunk["usage"]["completion_tokens"]
                        if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                            timing.piece(probes)
            except (HTTPClientError, RuntimeError) as exc:
                probes.note(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)

    try:
        await asyncio.gather(*(streamer(i) for i in range(k)))
    finally:
        await http.aclose()
    return probes
