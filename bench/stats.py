"""Latency percentiles and the per-run record."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(values_s: list[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "n": len(values_s),
        "p50": ms(percentile(values_s, 50)),
        "p95": ms(percentile(values_s, 95)),
        "p99": ms(percentile(values_s, 99)),
        "max": ms(max(values_s) if values_s else None),
        "mean": ms(sum(values_s) / len(values_s) if values_s else None),
    }


@dataclass
class RunResult:
    mode: str  # "direct" | "platform"
    scenario: str
    model: str
    in_flight: int
    jobs_requested: int
    jobs_completed: int = 0
    jobs_failed: int = 0
    errors: int = 0
    wrong_length: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    timed_out: bool = False
    job_latency_s: list[float] = field(default_factory=list)
    submit_latency_s: list[float] = field(default_factory=list)
    # jobs/s while all N clients were busy (bench.workload.JobClock.steady_jobs_per_s)
    steady_jobs_per_s: float | None = None
    # the N virtual clients start spread over this many seconds (0: all at once), the same in both modes
    ramp_s: float = 0.0
    # the warm-up's submits: the N clients' first jobs, on an idle stack (not steady state)
    warmup_submit_latency_s: list[float] = field(default_factory=list)
    poll_latency_s: list[float] = field(default_factory=list)
    # long-poll mode: plain GET /results/{id} (no wait) of a just-finished job, every K-th job
    probe_latency_s: list[float] = field(default_factory=list)
    # wall clock of the client's terminal answer minus the result's finished_at (set by the worker's
    # UPDATE, Postgres now() = start of its transaction): how long a finished job takes to reach the client
    answer_lag_s: list[float] = field(default_factory=list)
    polls: int = 0
    poll_mode: str = ""  # platform: "long" | "interval"
    client_stats: dict[str, int] = field(default_factory=dict)
    # CPU seconds of processes outside the stack during the phase, by command name (top 8)
    other_cpu_by_comm_s: dict[str, float] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    # streaming probes beside the load (bench.streaming): first piece, between pieces, cancel → abort
    stream_ttft_s: list[float] = field(default_factory=list)
    stream_gap_s: list[float] = field(default_factory=list)
    cancel_s: list[float] = field(default_factory=list)
    cancel_answer_s: list[float] = field(default_factory=list)
    stream_pieces: int = 0
    stream_tokens: int = 0
    stream_errors: list[str] = field(default_factory=list)

    def note_error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message[:300])

    @property
    def plain_poll_latency_s(self) -> list[float]:
        """Latency of a plain GET /results/{id} (no wait) under load: every poll in interval mode,
        the probes in long-poll mode."""
        return self.probe_latency_s if self.poll_mode == "long" else self.poll_latency_s

    @property
    def jobs_per_s(self) -> float:
        return self.jobs_completed / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in (
            "job_latency_s",
            "submit_latency_s",
            "warmup_submit_latency_s",
            "poll_latency_s",
            "probe_latency_s",
            "answer_lag_s",
            "stream_ttft_s",
            "stream_gap_s",
            "cancel_s",
            "cancel_answer_s",
        ):
            data.pop(key)
        if self.stream_pieces:
            data["stream_ttft_ms"] = summary_ms(self.stream_ttft_s)
            data["stream_gap_ms"] = summary_ms(self.stream_gap_s)
            data["cancel_ms"] = summary_ms(self.cancel_s)
            if self.cancel_answer_s:
                data["cancel_answer_ms"] = summary_ms(self.cancel_answer_s)
        data["jobs_per_s"] = round(self.jobs_per_s, 2)
        data["tokens_per_s"] = round(self.tokens_per_s, 1)
        data["job_latency_ms"] = summary_ms(self.job_latency_s)
        if self.mode == "platform":
            data["submit_latency_ms"] = summary_ms(self.submit_latency_s)
            data["warmup_submit_latency_ms"] = summary_ms(self.warmup_submit_latency_s)
            data["poll_latency_ms"] = summary_ms(self.poll_latency_s)
            data["probe_latency_ms"] = summary_ms(self.probe_latency_s)
            data["plain_poll_latency_ms"] = summary_ms(self.plain_poll_latency_s)
            data["answer_lag_ms"] = summary_ms(self.answer_lag_s)
            data["polls_per_job"] = (
                round(self.polls / self.jobs_completed, 2) if self.jobs_completed else None
            )
        done = self.jobs_completed or 1
        data["cpu_ms_per_job"] = {
            k: round(v * 1000 / done, 3) for k, v in self.cpu_s.items() if not k.startswith("_")
        }
        return data
