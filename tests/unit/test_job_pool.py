"""worker.pool.JobPool: a task whose body defers ends (is acked) when its job ends, not before; a warm
stop waits for the jobs in flight. Pure pool logic; tests/e2e/test_worker_shutdown.py runs it in a
real worker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from kombu.common import QoS

from worker.pool import JobPool, defer, start_when_room


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


def test_a_message_of_several_jobs_runs_at_most_limit_at_once_and_lowers_the_prefetch_count() -> None:
    pool = JobPool(2)
    qos = QoS(lambda prefetch_count: None, 8)  # kombu's, as the consumer holds it
    pool.consumer = SimpleNamespace(qos=qos)
    started: list[Callable[[], None]] = []

    def body() -> str:
        for _ in range(5):  # a `run_jobs` message of 5 jobs
            ended = defer()
            assert ended is not None
            start_when_room(started.append, ended, lambda: None)
        return "r"

    reported = _apply(pool, body)
    assert len(started) == 2 and pool.info["jobs-in-flight"] == 5  # 2 run, 3 wait for room
    assert qos.value == 8 - 4  # the message's first job holds its own prefetch slot
    started[0]()  # a job ends: the next one starts
    assert len(started) == 3 and qos.value == 4  # the first job's slot was the message's own
    for ended in started[1:3]:
        ended()
    assert len(started) == 5 and qos.value == 6
    for ended in started[3:]:
        ended()
    assert reported == ["r"] and qos.value == 8 and pool.info["jobs-in-flight"] == 0


def test_outside_the_pool_a_job_starts_at_once() -> None:
    started: list[Callable[[], None]] = []
    start_when_room(started.append, lambda: None, lambda: None)
    assert len(started) == 1


def test_a_warm_stop_gives_back_the_jobs_not_started_and_waits_for_the_running_one() -> None:
    pool = JobPool(1)
    pool.start()
    started: list[Callable[[], None]] = []
    given_back: list[int] = []

    def body() -> None:
        for k in range(3):
            ended = defer()
            assert ended is not None
            start_when_room(started.append, ended, lambda k=k: given_back.append(k))

    reported = _apply(pool, body)
    stopped = threading.Event()
    stopper = threading.Thread(target=lambda: (pool.stop(), stopped.set()))
    stopper.start()
    assert not stopped.wait(0.3)  # the running job holds the stop
    assert given_back == [1, 2] and len(started) == 1 and reported == []
    started[0]()
    assert stopped.wait(5) and reported == [None] and len(started) == 1
    stopper.join()
