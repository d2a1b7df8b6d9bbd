"""The worker's Celery pool: task bodies run inline, jobs run as coroutines on the runtime's loop.

The consumer's thread runs a task body itself (as Celery's `solo` pool does); the body hands its job
to the loop (`defer`) and returns at once. The task counts as finished, and its message is acked,
when the job ends, so the prefetch count (`-c`, WORKER_IN_FLIGHT, times a multiplier of 1) bounds the
jobs in flight and a warm shutdown waits for the running ones. Not Celery's `threads` pool: a thread
per job in flight that mostly waits, and hand-offs between threads for every step of every job.

Selected by `worker_pool` (worker/celery_app.py); under another pool `defer()` returns None and the
body waits for its job itself.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.concurrency.base import BasePool, apply_target

log = logging.getLogger(__name__)

_local = threading.local()


class _Task:
    """One task: reported to Celery once its body has returned and, if deferred, its job has ended."""

    def __init__(self, pool: JobPool, callback: Callable[[Any], None] | None) -> None:
        self._pool = pool
        self._callback = callback
        self._lock = threading.Lock()
        self._waiting = 1  # the body's return; +1 once it defers
        self._ret: Any = None

    def defer(self) -> Callable[[], None]:
        with self._lock:
            self._waiting += 1
        self._pool.job_started()
        return self._job_ended

    def body_returned(self, ret: Any) -> None:
        self._ret = ret
        self._one_less()

    def _job_ended(self) -> None:
        self._pool.job_ended()
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
        self._jobs = 0
        self._idle = threading.Condition()
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

    def on_stop(self) -> None:
        """Warm shutdown: the consumer has stopped; wait for the jobs in flight to end."""
        with self._idle:
            if self._jobs:
                log.info("waiting for %d jobs in flight to end", self._jobs)
            self._idle.wait_for(lambda: not self._jobs)
        super().on_stop()

    def _get_info(self) -> dict[str, Any]:
        return {
            "implementation": f"{type(self).__module__}:{type(self).__name__}",
            "max-concurrency": self.limit,
            "processes": [os.getpid()],
            "jobs-in-flight": self._jobs,
        }


def defer() -> Callable[[], None] | None:
    """For a task body run by JobPool: its task ends (and its message is acked) when the returned
    function is called, not when the body returns. None under any other pool."""
    task: _Task | None = getattr(_local, "task", None)
    return task.defer() if task is not None else None
