"""bench.streaming: reading the simulated engine's aborts from Triton's metrics text; a probe's
pause between its jobs."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from bench.streaming import abort_state, think
from bench.workload import Phase

METRICS = """\
# HELP sim_engine_cancelled_total Sequences dropped on cancel
# TYPE sim_engine_cancelled_total counter
sim_engine_cancelled_total{model="sim-llm"} 2
sim_engine_cancelled_total{model="sim-llm-slow"} 7
# HELP sim_engine_last_cancel_monotonic_seconds CLOCK_MONOTONIC time of the latest drop
# TYPE sim_engine_last_cancel_monotonic_seconds gauge
sim_engine_last_cancel_monotonic_seconds{model="sim-llm"} 10.5
sim_engine_last_cancel_monotonic_seconds{model="sim-llm-slow"} 1234.567
"""


def test_the_count_and_time_of_the_models_latest_abort() -> None:
    assert abort_state(METRICS, "sim-llm-slow") == (7.0, 1234.567)
    assert abort_state(METRICS, "sim-llm") == (2.0, 10.5)


def test_an_engine_that_does_not_say_when_gives_no_time() -> None:
    old = "\n".join(line for line in METRICS.splitlines() if "last_cancel" not in line) + "\n"
    assert abort_state(old, "sim-llm-slow") == (7.0, None)
    assert abort_state(METRICS, "another") == (0.0, None)


@pytest.mark.parametrize("think_s", [0.0, 0.05])
def test_a_probes_pause_is_random_within_its_bound(think_s: float) -> None:
    phase = Phase("latency", "sim-llm-slow", [], 1, 64, 60, probe_think_s=think_s)
    rng, pauses = random.Random(1), []

    async def pause() -> None:
        for _ in range(5):
            t0 = time.monotonic()
            await think(phase, rng)
            pauses.append(time.monotonic() - t0)

    asyncio.run(pause())
    assert all(p < think_s + 0.5 for p in pauses)  # (a loaded machine oversleeps)
    assert (len(set(round(p, 3) for p in pauses)) > 1) == (think_s > 0)  # back to back: no pause at all


def test_probes_that_never_end_are_stopped_after_the_grace_and_said_so() -> None:
    # A probe follows a job that never ends when Triton died mid-phase: the phase must still end.
    from bench.__main__ import Probing
    from bench.stats import RunResult
    from bench.streaming import StreamProbes

    async def never_ends(stop: asyncio.Event) -> StreamProbes:
        await asyncio.Event().wait()
        return StreamProbes()

    async def ends_when_asked(stop: asyncio.Event) -> StreamProbes:
        await stop.wait()
        return StreamProbes(ttft_s=[0.05], pieces=3)

    async def run() -> tuple[RunResult, RunResult, float]:
        stuck, fine = Probing(2, grace_s=0.2), Probing(2, grace_s=0.2)
        stuck.start(never_ends(stuck.stop))
        fine.start(ends_when_asked(fine.stop))
        stuck_run, fine_run = (RunResult("platform", "latency", "sim-llm-slow", 2, 10) for _ in range(2))
        t0 = time.monotonic()
        await stuck.finish(stuck_run)
        took = time.monotonic() - t0
        await fine.finish(fine_run)
        return stuck_run, fine_run, took

    stuck_run, fine_run, took = asyncio.run(run())
    assert took < 5 and "still running" in stuck_run.stream_errors[0]
    assert fine_run.stream_ttft_s == [0.05] and fine_run.stream_pieces == 3 and not fine_run.stream_errors
