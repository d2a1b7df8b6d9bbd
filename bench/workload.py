"""The jobs both modes run: prompts and seeds chosen so the simulator produces exactly
``max_tokens`` tokens and stops with ``length`` (no early EOS), so every job does the same work."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localtriton.engine import simulate

MAX_MODEL_LEN = 512  # the built-in sim-llm / sim-llm-slow model.json
SIM_MODELS = Path(__file__).resolve().parent.parent / "nvidia_triton" / "localtriton" / "models"

PROMPTS = [
    "Write a short story about a lighthouse keeper who discovers a message in a bottle.",
    "Explain how continuous batching increases the throughput of a language model server.",
    "Describe a walk through a forest in autumn, with the light coming through the trees.",
    "Summarize the tradeoffs between threads, processes and asyncio for an IO bound worker.",
    "List the steps to brew a good cup of coffee with a French press, in plain words.",
    "Write a haiku about GPUs waiting for work in a quiet data center at night.",
    "Give three reasons why a job queue should store results in a database, not the broker.",
    "Tell the history of the river that runs through the old city, from its source to the sea.",
]


@dataclass(frozen=True)
class Job:
    prompt_index: int
    seed: int

    @property
    def prompt(self) -> str:
        return PROMPTS[self.prompt_index]


@dataclass(frozen=True)
class Warmup:
    """Unmeasured jobs that the same N virtual clients run right before the measured ones, with no
    pause in between: the measurement starts in the steady state of N in flight, not with N clients
    starting at once on an idle stack (that cold burst's submit latency is reported separately).
    ``on_measure`` runs when the first measured job starts (it starts the CPU meter, the profiler)."""

    jobs: int = 0
    on_measure: Callable[[], object] | None = None

    def done(self) -> None:
        if self.on_measure is not None:
            self.on_measure()


class JobClock:
    """Job indexes for the N virtual clients of one run, and its measured window. Indexes below 0
    are the warm-up's; the window opens when job 0 is taken (``warmup.on_measure`` runs then) and
    closes at ``last_done``, which the run sets as measured jobs finish."""

    def __init__(self, total: int, warmup: Warmup | None) -> None:
        self.total = total
        self.warmup = warmup or Warmup()
        self._indexes = itertools.count(-self.warmup.jobs)
        self.start = self.last_done = time.monotonic()
        self.exhausted_at: float | None = None  # when a client first found no job left
        self._finished: list[float] = []  # every job's end, warm-up ones too

    def take(self) -> int | None:
        """The next job's index, None when all are taken."""
        i = next(self._indexes)
        if i >= self.total:
            if self.exhausted_at is None:
                self.exhausted_at = time.monotonic()
            return None
        if i == 0:
            self.start = self.last_done = time.monotonic()
            self.warmup.done()
        return i

    @property
    def wall_s(self) -> float:
        return self.last_done - self.start

    def finished(self, at: float) -> None:
        self._finished.append(at)

    def steady_jobs_per_s(self) -> float | None:
        """Jobs finished per second between the first measured job's start and the moment the jobs
        ran out, i.e. while all N clients were busy (no ramp, no tail). None if that window is empty."""
        end = self.exhausted_at
        if end is None or end <= self.start:
            return None
        return sum(self.start <= t <= end for t in self._finished) / (end - self.start)


def nominal_job_s(model: str, max_tokens: int) -> float:
    """How long one job takes on an idle simulated engine: a prefill step, then a decode step per
    further token (SIM_PREFILL_MS / SIM_DECODE_MS in the built-in model's config.pbtxt)."""
    config = (SIM_MODELS / model / "config.pbtxt").read_text()

    def ms(key: str) -> float:
        found = re.search(rf'key: "{key}" value: {{ string_value: "([0-9.]+)" }}', config)
        return float(found.group(1)) if found else 0.0

    return (ms("SIM_PREFILL_MS") + (max_tokens - 1) * ms("SIM_DECODE_MS")) / 1000


@dataclass(frozen=True)
class Phase:
    """What both modes of a scenario run: the same jobs, N in flight, the same limits, and the
    same start: virtual client k of N begins at k x ``ramp_s`` / N (0: all at once)."""

    scenario: str
    model: str
    jobs: list[Job]
    in_flight: int
    max_tokens: int
    time_limit_s: float
    ramp_s: float = 0.0
    probe_think_s: float = 0.0  # a streaming probe's pause between its jobs: uniform in [0, this]

    async def start_of(self, k: int) -> None:
        """Virtual client ``k`` waits for its turn to start."""
        if self.ramp_s > 0:
            await asyncio.sleep(k * self.ramp_s / self.in_flight)


@dataclass(frozen=True)
class Polling:
    """How the platform's virtual clients wait for a result."""

    mode: str  # "long" or "interval"
    interval_s: float
    long_poll_wait_s: float
    probe_every: int


def api_params(max_tokens: int, seed: int) -> dict[str, Any]:
    """Body of POST /models/send: what the API stores in result.params."""
    return {"max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0, "seed": seed}


def triton_params(max_tokens: int, seed: int) -> dict[str, Any]:
    """The sampling parameters the worker forwards for that body (worker.jobs.sampling_parameters:
    max_tokens, temperature, top_p, seed; the empty stop list is dropped)."""
    return {"max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0, "seed": seed}


def choose_jobs(count: int, max_tokens: int) -> list[Job]:
    """``count`` distinct (prompt, seed) pairs that each generate exactly ``max_tokens`` tokens."""
    jobs: list[Job] = []
    seed = 0
    while len(jobs) < count:
        for index, prompt in enumerate(PROMPTS):
            sim = simulate(prompt, triton_params(max_tokens, seed), MAX_MODEL_LEN)
            if sim.finish_reason == "length" and sim.completion_tokens == max_tokens:
                jobs.append(Job(index, seed))
        seed += 1
    return jobs[:count]
