"""One asyncio loop per worker process that owns the gRPC channel to Triton.

Celery's thread pool gives each job a thread; the threads hand their Triton call to this
loop, so a process holds as many requests in flight as it has threads on one connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

from app.config import Settings
from app.triton.inference import Generation, TritonInference


class InferenceRuntime:
    def __init__(self, settings: Settings) -> None:
        self._running: dict[str, concurrent.futures.Future[Generation]] = {}
        self._running_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="triton-io", daemon=True)
        self._thread.start()

        async def make() -> TritonInference:
            return TritonInference(
                settings.TRITON_GRPC_URL,
                connect_timeout_s=settings.TRITON_CONNECT_TIMEOUT_S,
                request_timeout_s=settings.TRITON_REQUEST_TIMEOUT_S,
            )

        self._inference = asyncio.run_coroutine_threadsafe(make(), self._loop).result()

    def generate(
        self, model: str, prompt: str, params: dict[str, Any], request_id: str, job_key: str | None = None
    ) -> Generation:
        """The generation; `concurrent.futures.CancelledError` when `cancel(job_key)` aborted it."""
        future = asyncio.run_coroutine_threadsafe(
            self._inference.generate(model, prompt, params, request_id), self._loop
        )
        if job_key is None:
            return future.result()
        with self._running_lock:
            self._running[job_key] = future
        try:
            return future.result()
        finally:
            with self._running_lock:
                self._running.pop(job_key, None)

    def cancel(self, job_key: str) -> bool:
        """Abort a running generation: its task is cancelled, which cancels the gRPC call, which
        makes Triton's vLLM backend abort the request in the engine."""
        with self._running_lock:
            future = self._running.get(job_key)
        return future is not None and future.cancel()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._inference.close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


_runtime: InferenceRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings) -> InferenceRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = InferenceRuntime(settings)
        return _runtime


def reset_runtime() -> None:
    """After a fork the loop thread does not exist in the child: start afresh."""
    global _runtime
    _runtime = None
