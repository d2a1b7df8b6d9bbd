"""The ceiling: the worker's own client code (TritonInference over gRPC streaming) driving the
local Triton directly with N requests in flight."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from app.triton.inference import GenerationError, TritonInference
from bench.stats import RunResult
from bench.workload import JobClock, Phase, Warmup, triton_params


async def run_direct(
    grpc_url: str,
    phase: Phase,
    total: int,
    *,
    warmup: Warmup | None = None,
    think_ms: float = 0.0,
    seed: int = 1,
) -> RunResult:
    """``total`` measured jobs after ``warmup.jobs`` unmeasured ones, in one continuous run (see Warmup).
    ``think_ms`` > 0: each virtual client waits an exponentially distributed time (that mean) before
    each job — the turnaround a job has through the platform, without the platform (bench.jitter)."""
    result = RunResult("direct", phase.scenario, phase.model, phase.in_flight, total)
    client = TritonInference(grpc_url, connect_timeout_s=5.0, request_timeout_s=max(phase.time_limit_s, 30.0))
    result.ramp_s = phase.ramp_s
    clock = JobClock(total, warmup)
    run_tag = uuid.uuid4().hex[:8]
    deadline = clock.start + phase.time_limit_s
    rng = random.Random(seed)

    async def virtual_client(k: int) -> None:
        await phase.start_of(k)
        while time.monotonic() < deadline:
            i = clock.take()  # < 0: a warm-up job
            if i is None:
                return
            if think_ms > 0:
                await asyncio.sleep(rng.expovariate(1000 / think_ms))
            job = phase.jobs[i % len(phase.jobs)]
            t0 = time.monotonic()
            try:
                gen = await asyncio.wait_for(
                    client.generate(
                        phase.model,
                        job.prompt,
                        triton_params(phase.max_tokens, job.seed),
                        request_id=f"bench-{run_tag}-{i}",
                    ),
                    timeout=max(deadline - t0, 0.001),
                )
            except TimeoutError:
                result.timed_out = True
                return
            except GenerationError as exc:
                result.jobs_failed += i >= 0
                result.note_error(exc.message)
                continue
            now = time.monotonic()
            clock.finished(now)
            if i < 0:
                continue
            clock.last_done = now
            result.jobs_completed += 1
            result.job_latency_s.append(now - t0)
            result.tokens += gen.completion_tokens or 0
            if gen.completion_tokens != phase.max_tokens:
                result.wrong_length += 1

    try:
        await asyncio.gather(*(virtual_client(k) for k in range(phase.in_flight)))
    finally:
        await client.close()
    if time.monotonic() >= deadline:
        result.timed_out = True
    result.wall_s = clock.wall_s
    result.steady_jobs_per_s = clock.steady_jobs_per_s()
    return result
