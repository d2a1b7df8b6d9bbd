"""The benchmark's start pattern: the N virtual clients spread over one job's nominal duration."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.workload import JobClock, Phase, Warmup, nominal_job_s

pytestmark = pytest.mark.anyio


def test_nominal_job_duration_comes_from_the_model_config() -> None:
    # sim-llm-slow: 20 ms prefill (first token), then 15 ms per further token.
    assert nominal_job_s("sim-llm-slow", 64) == pytest.approx(0.020 + 63 * 0.015)
    assert nominal_job_s("sim-llm-slow", 1) == pytest.approx(0.020)
    assert nominal_job_s("sim-llm", 64) == 0.0  # zero latency: everyone starts at once


@pytest.mark.parametrize("ramp_s", [0.0, 0.4])
async def test_client_k_starts_at_k_times_ramp_over_n(ramp_s: float) -> None:
    phase = Phase("latency", "sim-llm-slow", [], in_flight=8, max_tokens=64, time_limit_s=10, ramp_s=ramp_s)
    t0 = time.monotonic()
    started: dict[int, float] = {}

    async def client(k: int) -> None:
        await phase.start_of(k)
        started[k] = time.monotonic() - t0

    await asyncio.gather(*(client(k) for k in range(8)))
    for k, at in started.items():
        assert at == pytest.approx(k * ramp_s / 8, abs=0.03)


def test_steady_rate_counts_only_jobs_finished_while_all_clients_were_busy() -> None:
    clock = JobClock(total=2, warmup=Warmup(jobs=1))
    assert [clock.take(), clock.take(), clock.take()] == [-1, 0, 1]
    assert clock.steady_jobs_per_s() is None  # jobs left: no window yet
    assert clock.take() is None and clock.exhausted_at is not None
    clock.start, clock.exhausted_at = 100.0, 102.0
    for at in (99.0, 100.5, 101.0, 101.9, 103.0):  # a warm-up job before, a tail job after
        clock.finished(at)
    assert clock.steady_jobs_per_s() == pytest.approx(3 / 2.0)
