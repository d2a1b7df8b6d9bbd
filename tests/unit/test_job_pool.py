"""worker.pool.JobPool: a task whose body defers ends (is acked) when its job ends, not before; a warm
stop waits for the jobs in flight. Pure pool logic; tests/e2e/test_worker_shutdown.py runs it in a
real worker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from worker.pool import JobPool, defer


def _apply(pool: JobPool, body: Callable[[], Any]) -> list[Any]:
    reported: list[Any] = []
    pool.on_apply(body, (), {}, callback=reported.append)
    return reported


def test_a_body_that_does_not_defer_ends_on_return() -> None:
    pool = JobPool(8)
    assert pool.limit == 8  # the prefetch count: jobs in flight
    assert _apply(pool, lambda: "r") == ["r"]


def test_a_deferred_task_ends_when_its_job_ends() -> None:
    pool = JobPool(8)
    ends: list[Callable[[], None]] = []

    def body() -> str:
        ended = defer()
        assert ended is not None
        ends.append(ended)
        return "r"

    reported = _apply(pool, body)
    assert reported == [] and pool.info["jobs-in-flight"] == 1  # the body returned, the job runs
    ends[0]()
    assert reported == ["r"] and pool.info["jobs-in-flight"] == 0


def test_a_job_that_ends_before_its_body_returns_is_reported_once_at_the_return() -> None:
    pool = JobPool(8)

    def body() -> str:
        ended = defer()
        assert ended is not None
        ended()  # e.g. the loop ran the whole job before the consumer's thread went on
        return "r"

    assert _apply(pool, body) == ["r"]


def test_defer_outside_the_pool_is_none() -> None:
    assert defer() is None


def test_a_warm_stop_waits_for_the_jobs_in_flight() -> None:
    pool = JobPool(8)
    pool.start()
    ends: list[Callable[[], None]] = []

    def body() -> None:
        ended = defer()
        assert ended is not None
        ends.append(ended)

    reported = _apply(pool, body)
    stopped = threading.Event()
    stopper = threading.Thread(target=lambda: (pool.stop(), stopped.set()))
    stopper.start()
    assert not stopped.wait(0.3)  # still running one job
    ends[0]()
    assert stopped.wait(5) and reported == [None]
    stopper.join()
