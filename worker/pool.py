"""The worker's Celery pool: task bodies run inline, jobs run as coroutines on the runtime's loop.

The consumer's thread runs a task body itself (as Celery's `solo` pool does); the body hands its job
to the loop (`defer`) and returns at once. The task counts as finished, and its message is acked,
when the job ends, so the prefetch count (`-c`, WORKER_IN_FLIGHT, times a multiplier of 1) bounds the
jobs in flight and a warm shutdown waits for the running ones. A message may carry several jobs
(`run_jobs`): each job past a message's first lowers the prefetch count until it ends, so that
the worker does not take more jobs than it runs, and a job starts only while fewer than the limit
run (`start_when_room`), the others of its message waiting their turn. Not Celery's `threads` pool: a thread
per job in flight that mostly waits, and hand-offs between threads for every step of every job.

Selected by `worker_pool` (worker/celery_app.py); under another pool `defer()` returns None and the
body waits for its job itself.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.concurrency.base import BasePool, apply_target

log = logging.getLogger(__name__)

_local = threading.local()


class _Task:
    """One task: reported to Celery once its body has returned and, if deferred, its job has ended."""

    def __init__(self, pool: JobPool, callback: Callable[[Any], None] | None) -> None:
        self.pool = pool
        self._callback = callback
        self._lock = threading.Lock()
        self._waiting = 1  # the body's return; +1 per job it defers
        self._deferred = 0
        self._ret: Any = None

    def defer(self) -> Callable[[], None]:
        with self._lock:
            self._waiting += 1
            self._deferred += 1
            extra = self._deferred > 1  # the message's prefetch slot covers its first job only
        self.pool.job_started()
        if not extra:
            return self._job_ended
        lent = self.pool.lend_slot()

        def extra_job_ended() -> None:
            self.pool.return_slot(lent)
            self._job_ended()

        return extra_job_ended

    def body_returned(self, ret: Any) -> None:
        self._ret = ret
        self._one_less()

    def _job_ended(self) -> None:
        self.pool.job_ended()
        self._one_less()

    def _one_less(self) -> None:
        with self._lock:
            self._waiting -= 1
            last = self._waiting == 0
        if last and self._callback is not None:
            self._callback(self._ret)  # Request.on_success: acks the message (as from a pool thread)


class JobPool(BasePool):
    """Celery's solo pool (bodies run inline) whose tasks may finish after their body has returned
    (see `defer`)."""

    body_can_be_buffer = True
    signal_safe = False  # its stop waits for jobs: not from within the signal handler (as threads)

    def __init__(self, limit: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(limit or 1, *args, **kwargs)  # the prefetch count is limit x multiplier
        self._jobs = 0  # deferred and not ended (running, or waiting for room)
        self._running = 0
        self._backlog: deque[tuple[Callable[[], None], Callable[[], None]]] = deque()
        self._idle = threading.Condition()
        self.consumer: Any = None  # Celery's consumer, once it consumes (worker/celery_app.py)
        # A warm stop waits this long for the jobs in flight, then `hand_back()` (worker/celery_app.py)
        # asks them to go back to the queue; None: wait for their end.
        self.shutdown_grace_s: float | None = None
        self.hand_back: Callable[[], None] | None = None
        self._qos_lock = threading.Lock()
        # As the solo pool does: this process is the pool's one process (the worker passes (app,
        # hostname) as initargs to every pool).
        initargs = self.options.get("initargs") or (None, None)
        signals.worker_process_init.send(sender=initargs[1])

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[[Any], None] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        **_: Any,
    ) -> None:
        task = _Task(self, callback)
        _local.task = task
        try:
            apply_target(target, args, kwargs, task.body_returned, accept_callback)
        finally:
            _local.task = None

    def job_started(self) -> None:
        with self._idle:
            self._jobs += 1

    def job_ended(self) -> None:
        with self._idle:
            self._jobs -= 1
            if not self._jobs:
                self._idle.notify_all()

    def start_when_room(
        self,
        start: Callable[[Callable[[], None]], None],
        ended: Callable[[], None],
        give_back: Callable[[], None],
    ) -> None:
        """`start(ended)` now if fewer than `limit` jobs run, else when one ends (in order); the
        `ended` it is given frees its room, then calls this one. A job still waiting at a warm stop
        is not started: `give_back()`, then `ended()`."""

        def room_freed() -> None:
            with self._idle:
                self._running -= 1
            self._start_waiting()
            ended()

        def stopped() -> None:
            try:
                give_back()
            finally:
                ended()

        with self._idle:
            self._backlog.append((functools.partial(start, room_freed), stopped))
        self._start_waiting()

    def _start_waiting(self) -> None:
        while True:
            with self._idle:
                if not self._backlog or self._running >= self.limit:
                    return
                start, _ = self._backlog.popleft()
                self._running += 1
            try:
                start()
            except Exception:  # the start ended its job itself: the others go on
                log.exception("a job could not start")

    def lend_slot(self) -> tuple[Any, int]:
        """One less message prefetched while a message's extra job runs: the consumer's prefetch
        count (kombu.common.QoS, applied by the consumer's loop) and how much it was lowered (0 at 1)."""
        qos = getattr(self.consumer, "qos", None)
        if qos is None:
            return None, 0
        with self._qos_lock:
            before = qos.value
            return qos, int(before - qos.decrement_eventually())

    def return_slot(self, lent: tuple[Any, int]) -> None:
        qos, n = lent
        current: Any = getattr(self.consumer, "qos", None)
        # A consumer restarted since (broker reconnect, Triton outage) has a new count, already full.
        if n and current is not None and current is qos:
            with self._qos_lock:
                current.increment_eventually(n)

    def on_stop(self) -> None:
        """Warm shutdown: the consumer has stopped; give back the jobs not started, wait for the
        jobs in flight to end."""
        with self._idle:
            waiting, self._backlog = list(self._backlog), deque()
        if waiting:
            log.info("giving back %d jobs not started", len(waiting))
        for _, stopped in waiting:
            try:
                stopped()
            except Exception:  # not given back: the sweeper finds it pending
                log.exception("a job not started could not be given back")
        with self._idle:
            if self._jobs:
                log.info("waiting up to %ss for %d jobs in flight to end", self.shutdown_grace_s, self._jobs)
            if not self._idle.wait_for(lambda: not self._jobs, self.shutdown_grace_s) and self.hand_back:
                log.info("handing %d jobs still running back to the queue", self._jobs)
                self.hand_back()
                self._idle.wait_for(lambda: not self._jobs)  # a release and a message each
        super().on_stop()

    def _get_info(self) -> dict[str, Any]:
        return {
            "implementation": f"{type(self).__module__}:{type(self).__name__}",
            "max-concurrency": self.limit,
            "processes": [os.getpid()],
            "jobs-in-flight": self._jobs,
        }


def start_when_room(
    start: Callable[[Callable[[], None]], None], ended: Callable[[], None], give_back: Callable[[], None]
) -> None:
    """For a task body run by JobPool, with what `defer()` returned: see `JobPool.start_when_room`."""
    task: _Task | None = getattr(_local, "task", None)
    if task is None:
        start(ended)
    else:
        task.pool.start_when_room(start, ended, give_back)


def defer() -> Callable[[], None] | None:
    """For a task body run by JobPool: its task ends (and its message is acked) when the returned
    function is called, not when the body returns. None under any other pool."""
    task: _Task | None = getattr(_local, "task", None)
    return task.defer() if task is not None else None
