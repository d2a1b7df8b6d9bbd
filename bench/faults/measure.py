"""From a scenario's record (what the client saw) and the database (what happened to each job) to
its figures, and the targets each scenario is held to."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.faults.scenarios import Run
from bench.faults.stack import MODEL
from bench.workload import nominal_job_s

ANSWER_TARGET_S = 1.0  # Postgres down: every request answered within this
RECOVERY_TARGET_S = 20.0  # worker kill -9: every affected job done within this of the kill, plus its run time


def run_time_s(tokens: int | None) -> float:
    """The job's nominal run time on the simulated model (a prefill step, a decode step per further token)."""
    return nominal_job_s(MODEL, max(1, tokens or 1))


@dataclass
class Figures:
    name: str
    title: str
    submitted: int
    accepted: int
    refused: dict[str, int]  # answer to a refused submit ("503", "no answer", ...) -> count
    completed: int
    failed: int
    lost: int
    lost_pending: int
    lost_missing: int
    twice: int
    drained_after_s: float | None  # from the last submit until every accepted job was terminal
    recovery_s: float | None  # slowest affected job: fault (or service back) to its end, minus its run time
    affected: int
    slowest_answer_s: float | None  # Postgres down: slowest answer of a request started during the outage
    slow_answers: int  # ... of those, answered later than ANSWER_TARGET_S or not at all
    errors_5xx: int  # answers 500-599 other than 503 (any request of the scenario)
    no_answer: int  # malformed requests without an HTTP answer
    extra_requests: int  # probes / malformed requests sent besides the load
    generations: int | None = None  # inference requests Triton received for the scenario's jobs
    regenerated: int | None = None  # jobs Triton received more than once
    fail_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    sweepers: int | None = None  # workers holding the sweeper's advisory lock after the scenario
    malformed: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> answer -> count
    targets_missed: list[str] = field(default_factory=list)

    @property
    def guarantee_broken(self) -> bool:
        return self.lost > 0 or self.twice > 0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def figures(run: Run) -> Figures:
    accepted = {a.result_id: a.accepted_at for a in run.record.accepted}
    rows = run.rows
    statuses = Counter(rows[r]["status"] if r in rows else "missing" for r in accepted)
    refused: Counter[str] = Counter()
    for a in run.record.answers:
        if a.kind == "submit" and not (a.status is not None and 200 <= a.status < 300):
            refused["no answer" if a.status is None else str(a.status)] += 1

    finished = [rows[r]["finished"] for r in accepted if r in rows and rows[r]["finished"] is not None]
    lost_pending = statuses.get("pending", 0)
    lost_missing = statuses.get("missing", 0)
    drained = None
    if not lost_pending and not lost_missing and finished:
        drained = max(0.0, max(finished) - run.record.last_submit_at)

    recovery: float | None = None
    affected = 0
    for rid, accepted_at in accepted.items():
        row = rows.get(rid)
        done = row["finished"] if row else None
        # The latest fault this job lived through: accepted before it was over, not ended when it began.
        hit = [e for e in run.events if accepted_at < e.end and (done is None or done > e.start)]
        if not hit:
            continue
        affected += 1
        event = max(hit, key=lambda e: e.start)
        if done is None:
            recovery = math.inf
            continue
        spent = done - max(event.end, accepted_at) - run_time_s(row["completion_tokens"] if row else None)
        recovery = max(recovery if recovery is not None else 0.0, max(0.0, spent))

    slowest = None
    slow = 0
    if run.window is not None:
        lo, hi = run.window
        during = [a for a in (*run.record.answers, *run.probes.answers) if lo <= a.started <= hi]
        for a in during:
            took = math.inf if a.status is None else a.elapsed_s
            slowest = took if slowest is None else max(slowest, took)
            slow += took > ANSWER_TARGET_S
    everything = [*run.record.answers, *run.probes.answers]
    fail_errors = Counter(
        _shorten(rows[r]["error"]) for r in accepted if r in rows and rows[r]["status"] == "failed"
    )
    f = Figures(
        name=run.name,
        title=run.title,
        submitted=run.record.submitted,
        accepted=len(accepted),
        refused=dict(refused),
        completed=statuses.get("completed", 0),
        failed=statuses.get("failed", 0) + statuses.get("cancelled", 0),
        lost=lost_pending + lost_missing,
        lost_pending=lost_pending,
        lost_missing=lost_missing,
        twice=len(run.terminal_writes),
        drained_after_s=drained,
        recovery_s=recovery,
        affected=affected,
        slowest_answer_s=slowest,
        slow_answers=slow,
        errors_5xx=sum(1 for a in everything if a.status is not None and a.status >= 500 and a.status != 503),
        no_answer=sum(1 for a in run.probes.answers if a.status is None and a.kind.startswith("malformed")),
        extra_requests=len(run.probes.answers),
        fail_errors=[f"{n}x {e}" for e, n in fail_errors.most_common(3)],
        notes=list(run.notes),
        events=[e.name for e in run.events],
    )
    if run.name == "malformed":
        bad = Counter(
            f"{a.kind.removeprefix('malformed: ')} → {a.status or a.error}"
            for a in run.probes.answers
            if a.status is None or a.status >= 500
        )
        f.notes += [f"{n}x {what}" for what, n in bad.most_common(8)]
        answers = Counter(str(a.status or "none") for a in run.probes.answers)
        f.notes.append("malformed answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())))
        f.malformed = {
            kind: dict(Counter(str(a.status or a.error) for a in run.probes.answers if a.kind == kind))
            for kind in sorted({a.kind for a in run.probes.answers})
        }
    if run.sweepers is not None:
        f.sweepers = run.sweepers[0]
        f.notes.append(
            f"after the scenario: {run.sweepers[0]} sweeper holding the lock, {run.sweepers[1]} waiting"
        )
    if run.drain_timed_out:
        f.notes.append("the drain timed out: the pending jobs count as lost")
    f.targets_missed = targets_missed(f)
    return f


def targets_missed(f: Figures) -> list[str]:
    """The timing and input targets (0 lost / 0 finished twice is the guarantee, reported apart)."""
    missed = []
    if f.name == "worker-kill" and f.recovery_s is not None and f.recovery_s > RECOVERY_TARGET_S:
        missed.append(
            f"worker kill: every affected job done within {RECOVERY_TARGET_S:.0f} s of the kill plus its run "
            f"time: the slowest took {_secs(f.recovery_s)}"
        )
    if f.sweepers is not None and f.sweepers > 1:
        missed.append(f"{f.title}: exactly one sweeper at a time: {f.sweepers} held the sweeper lock")
    if f.name == "triton" and f.failed:
        missed.append(f"Triton down: 0 failed jobs: {f.failed} failed")
    if f.name == "postgres" and (f.slowest_answer_s is None or f.slowest_answer_s > ANSWER_TARGET_S):
        missed.append(
            f"Postgres down: every request answered within {ANSWER_TARGET_S:.0f} s: {f.slow_answers} were not "
            f"(the slowest: {_secs(f.slowest_answer_s)})"
        )
    if f.name == "malformed" and (f.errors_5xx or f.no_answer):
        missed.append(
            f"malformed input: an answer and no 5xx: {f.errors_5xx} 5xx, {f.no_answer} without an answer"
        )
    return missed


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return "never" if math.isinf(value) else f"{value:.1f} s"


def _shorten(error: str | None) -> str:
    text = (error or "").replace("\n", " ")
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", text)
    return text[:140]


def secs(value: float | None) -> str:
    return _secs(value)


def guarantee_broken(f: Figures) -> list[str]:
    broken = []
    if f.lost:
        broken.append(
            f"0 lost: {f.lost} lost ({f.lost_pending} still pending, {f.lost_missing} not in the database)"
        )
    if f.twice:
        broken.append(f"0 finished twice: {f.twice} written terminal more than once")
    return broken
