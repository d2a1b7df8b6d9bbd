"""One asyncio loop per worker process: it owns the gRPC channel to Triton and runs the jobs.

Each job is a coroutine on this loop (worker/jobs.py, started by the Celery task through
worker/pool.py), so a process holds as many requests in flight as its prefetch count allows on one
connection, without a thread per job. The loop also listens for cancel notices (the API publishes a
cancelled job's id; every worker process hears it, the one running the job aborts it on the spot,
the others remember it a while so that a job claimed just after its cancel never starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from app.config import Settings
from app.notify import cancel_channel
from app.subscription import subscribe_forever
from app.triton.inference import Aborted, Generation, TritonInference
from worker.token_streams import StreamSink, StreamWriter

log = logging.getLogger(__name__)

# A cancel that arrives before its job started is remembered this long (the job then never runs).
_REMEMBER_CANCELS_S = 60.0
# How long a new process waits for its cancel subscription before taking its first job.
_SUBSCRIBE_WAIT_S = 2.0


class Stopped(Exception):
    """A generation stopped before its end: `reason` is "cancelled", "deadline" or "shutdown" (this
    worker is stopping: the job goes to another); `partial` is what it had produced (streamed jobs
    only: a non-streamed request has nothing to show until its end)."""

    def __init__(self, reason: str, partial: Generation) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


class InferenceRuntime:
    def __init__(self, settings: Settings) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}  # generations by job key; on the loop only
        self._jobs: set[asyncio.Task[None]] = set()  # the jobs running (the loop keeps weak references)
        self._cancels: OrderedDict[str, float] = OrderedDict()
        self._cancels_lock = threading.Lock()
        self._stopping = False  # set on the loop: no generation starts, the running ones are aborted
        self._loop = uvloop.new_event_loop()  # the jobs, gRPC and Redis I/O: libuv costs less per callback
        self._thread = threading.Thread(target=self._loop.run_forever, name="triton-io", daemon=True)
        self._thread.start()

        async def make() -> tuple[TritonInference, StreamWriter, asyncio.Task[None]]:
            inference = TritonInference(
                settings.TRITON_GRPC_URL,
                connect_timeout_s=settings.TRITON_CONNECT_TIMEOUT_S,
                request_timeout_s=settings.TRITON_REQUEST_TIMEOUT_S,
            )
            subscribed = asyncio.Event()
            listener = asyncio.create_task(
                subscribe_forever(
                    settings.REDIS_URL,
                    cancel_channel(settings),
                    "cancel notices",  # while lost, cancels are missed: those jobs run to their end
                    subscribed,
                    self._on_cancel_notice,
                    lambda: None,
                )
            )
            with contextlib.suppress(TimeoutError):  # Redis late: jobs go on, the subscription follows
                await asyncio.wait_for(subscribed.wait(), _SUBSCRIBE_WAIT_S)
            return inference, StreamWriter(settings), listener

        made: tuple[TritonInference, StreamWriter, asyncio.Task[None]] = self._call(make())
        self._inference, self._streams, self._listener = made

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, job: Coroutine[Any, Any, None], on_end: Callable[[], None]) -> None:
        """Start a job on the loop (from any thread); `on_end()` is called on the loop when it ends."""
        self._loop.call_soon_threadsafe(self._spawn, job, on_end)

    def run(self, job: Coroutine[Any, Any, None]) -> None:
        """Run a job on the loop and wait for its end (for a caller with a thread to spare)."""
        self._call(job)

    def _spawn(self, job: Coroutine[Any, Any, None], on_end: Callable[[], None]) -> None:
        task = self._loop.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(functools.partial(self._ended, on_end))

    def _ended(self, on_end: Callable[[], None], task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("job coroutine failed", exc_info=task.exception())
        on_end()

    async def open_stream(self, result_id: uuid.UUID, ran_before: bool) -> StreamSink:
        if not ran_before:  # the common case: nothing published before, no round trip to Redis
            return self._streams.first_sink(result_id)
        return await self._streams.open(result_id)

    async def generate(
        self,
        model: str,
        prompt: str,
        params: dict[str, Any],
        request_id: str,
        job_key: str,
        *,
        stream: StreamSink | None = None,
        timeout_s: float | None = None,
    ) -> Generation:
        """The generation (on the loop); `Stopped` when a cancel notice for `job_key` or the
        `timeout_s` deadline ended it."""
        task = asyncio.current_task()
        assert task is not None
        try:
            return await self._run(job_key, model, prompt, params, request_id, stream, timeout_s)
        finally:
            if task.cancelling():  # a cancel notice, now a `Stopped`: the job goes on to record it
                task.uncancel()

    async def _run(
        self,
        job_key: str,
        model: str,
        prompt: str,
        params: dict[str, Any],
        request_id: str,
        stream: StreamSink | None,
        timeout_s: float | None,
    ) -> Generation:
        if self.was_cancelled(job_key):  # its cancel came while the job was being claimed
            raise Stopped("cancelled", Generation("", None, None, None))
        if self._stopping:
            raise Stopped("shutdown", Generation("", None, None, None))
        task = asyncio.current_task()
        assert task is not None
        self._tasks[job_key] = task
        try:
            async with asyncio.timeout(timeout_s):
                return await self._inference.generate(model, prompt, params, request_id, on_text=stream)
        except Aborted as exc:
            raise Stopped(self._why_stopped(job_key, "deadline"), exc.partial) from None
        except TimeoutError:  # the deadline passed before the request was sent (waiting for Triton)
            raise Stopped("deadline", Generation("", None, None, None)) from None
        except asyncio.CancelledError:  # cancelled before the request was sent
            raise Stopped(self._why_stopped(job_key, "cancelled"), Generation("", None, None, None)) from None
        finally:
            self._tasks.pop(job_key, None)

    def _why_stopped(self, job_key: str, otherwise: str) -> str:
        if self.was_cancelled(job_key):  # a client's cancel wins over the worker's own stop
            return "cancelled"
        return "shutdown" if self._stopping else otherwise

    def hand_back(self) -> None:
        """This worker is stopping (from any thread): abort every generation and start none, so that
        each job goes back to the queue for another worker (worker/jobs.py)."""
        self._loop.call_soon_threadsafe(self._abort_all)

    def _abort_all(self) -> None:
        self._stopping = True
        for task in self._tasks.values():
            task.cancel()

    def _on_cancel_notice(self, data: bytes) -> None:
        """On the loop: abort the job's generation if it runs here (its gRPC call is cancelled, which
        makes Triton's vLLM backend abort the request in the engine), and never start it later."""
        job_key = data.decode()
        now = time.monotonic()
        with self._cancels_lock:
            self._cancels[job_key] = now
            while self._cancels and next(iter(self._cancels.values())) < now - _REMEMBER_CANCELS_S:
                self._cancels.popitem(last=False)
        task = self._tasks.get(job_key)
        if task is not None:
            task.cancel()

    def was_cancelled(self, job_key: str) -> bool:
        with self._cancels_lock:
            return job_key in self._cancels

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._listener.cancel)
        self._call(self._inference.close())
        self._call(self._streams.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


_runtime: InferenceRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings) -> InferenceRuntime:
    global _runtime
    if _runtime is not None:  # every job asks: no lock once it exists
        return _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = InferenceRuntime(settings)
        return _runtime


def reset_runtime() -> None:
    """After a fork the loop thread does not exist in the child: start afresh."""
    global _runtime
    _runtime = None
