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
