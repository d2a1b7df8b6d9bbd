"""The fault suite's arithmetic: what counts as lost, finished twice, affected by a fault, and how a
job's recovery and the slowest answer are measured (bench/faults/measure.py)."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from bench.faults.load import Accepted, Answer
from bench.faults.measure import figures, run_time_s
from bench.faults.report import verdict
from bench.faults.scenarios import Event, Run


def _row(status: str, finished: float | None, tokens: int | None = 100) -> dict[str, object]:
    return {"status": status, "created": 0.0, "finished": finished, "completion_tokens": tokens, "attempts": 1,
            "error": "boom" if status == "failed" else None}  # fmt: skip


def _run(name: str) -> Run:
    run = Run(name, name, "t")
    run.record.submitted = 5
    run.record.last_submit_at = 100.0
    return run


def test_lost_counts_pending_and_missing_accepted_jobs_only() -> None:
    run = _run("api-kill")
    run.record.accepted = [Accepted(r, 10.0) for r in ("a", "b", "c", "d")]
    run.rows = {"a": _row("completed", 50.0), "b": _row("failed", 60.0), "c": _row("pending", None),
                "x": _row("pending", None)}  # fmt: skip  # "x": created, never acknowledged
    run.record.answers = [Answer("submit", 1.0, 0.1, 503), Answer("submit", 1.0, 30.0, None)]
    f = figures(run)
    assert (f.accepted, f.completed, f.failed, f.lost, f.lost_pending, f.lost_missing) == (4, 1, 1, 2, 1, 1)
    assert f.refused == {"503": 1, "no answer": 1}
    assert f.drained_after_s is None  # not all terminal


def test_finished_twice_comes_from_the_audit_of_terminal_writes() -> None:
    run = _run("rolling")
    run.record.accepted = [Accepted("a", 10.0)]
    run.rows = {"a": _row("completed", 50.0)}
    run.terminal_writes = {"a": 2}
    f = figures(run)
    assert f.twice == 1 and f.lost == 0


def test_recovery_is_measured_from_the_latest_fault_the_job_lived_through_minus_its_run_time() -> None:
    run = _run("worker-kill")
    run.events = [Event("kill 1", 20.0, 20.0), Event("kill 2", 40.0, 40.0)]
    run.record.accepted = [
        Accepted("before-both", 15.0),  # pending through both kills, done at 58
        Accepted("done-before", 5.0),  # ended before the first kill: not affected
        Accepted("after-both", 45.0),  # accepted after the last kill: not affected
    ]
    run.rows = {"before-both": _row("completed", 58.0), "done-before": _row("completed", 12.0),
                "after-both": _row("completed", 90.0)}  # fmt: skip
    f = figures(run)
    assert f.affected == 1
    assert f.recovery_s == pytest.approx(58.0 - 40.0 - run_time_s(100))
    assert f.targets_missed == []


def test_a_worker_kill_recovery_over_20_s_is_a_missed_target_not_a_broken_guarantee() -> None:
    run = _run("worker-kill")
    run.events = [Event("kill", 20.0, 20.0)]
    run.record.accepted = [Accepted("a", 15.0)]
    run.rows = {"a": _row("completed", 20.0 + 25.0 + run_time_s(100))}
    f = figures(run)
    assert f.recovery_s == pytest.approx(25.0)
    assert len(f.targets_missed) == 1 and "20 s" in f.targets_missed[0]
    console = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    assert verdict(console, [f], targets_fail=True) == 2
    assert verdict(console, [f], targets_fail=False) == 0


def test_outage_recovery_counts_from_the_service_being_back_and_unfinished_affected_jobs_never_recover() -> (
    None
):
    run = _run("triton")
    run.events = [Event("down", 20.0, 60.0)]
    run.record.accepted = [Accepted("a", 30.0), Accepted("b", 30.0)]
    run.rows = {"a": _row("completed", 64.0), "b": _row("pending", None)}
    f = figures(run)
    assert f.affected == 2 and math.isinf(f.recovery_s or 0.0)
    console = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    assert verdict(console, [f], targets_fail=False) == 1  # lost: fails whatever the targets


def test_postgres_down_every_request_started_in_the_window_counts_and_no_answer_is_infinitely_slow() -> None:
    run = _run("postgres")
    run.window = (10.0, 20.0)
    run.record.answers = [Answer("submit", 11.0, 0.3, 503), Answer("submit", 25.0, 9.0, 201)]
    run.probes.answers = [Answer("GET /health/ready", 12.0, 0.8, 503)]
    f = figures(run)
    assert f.slowest_answer_s == pytest.approx(0.8) and f.slow_answers == 0 and f.targets_missed == []
    run.probes.answers.append(Answer("GET /results/", 13.0, 40.0, None))
    f = figures(run)
    assert math.isinf(f.slowest_answer_s or 0.0) and f.slow_answers == 1
    assert "within 1 s" in f.targets_missed[0]
