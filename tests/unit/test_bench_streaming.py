"""bench.streaming: reading the simulated engine's aborts from Triton's metrics text."""

from __future__ import annotations

from bench.streaming import abort_state

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
