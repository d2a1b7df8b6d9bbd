"""Triton outages: the worker waits for Triton instead of spending its jobs' attempts.

When a generation fails because Triton cannot be reached, the job is given back (its attempt not
counted) and its message returned to Redis, and this process stops consuming from the broker
(Celery's own consumer control, on the worker itself: no broadcast needed). One thread then asks
Triton every TRITON_PROBE_S whether it is ready; when it is, the process consumes again. Jobs thus
wait in Redis, costing nothing, and fail for the outage only at their deadline (the sweeper says so).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from app.config import Settings
from app.triton.inference import GenerationError

log = logging.getLogger(__name__)

# What a generation error says when Triton could not be reached at all (not a job's own failure).
_UNREACHABLE = (
    "unreachable",
    "grpc error unavailable",
    "connection refused",
    "failed to connect",
    "socket closed",
)
# A call cut under way: Triton gone, or a failure of that one request (Triton is asked which).
_CUT = ("grpc error internal: internal error from core", "closed the stream before the final response")


def triton_ready(grpc_url: str, timeout_s: float) -> bool:
    """Triton answers ServerReady over gRPC (a fresh channel: no reconnect backoff carried over)."""
    channel = grpc.insecure_channel(grpc_url)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return bool(stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s).ready)
    except grpc.RpcError:
        return False
    finally:
        channel.close()


class TritonGate:
    """This process's view of Triton: up, or down since when and why."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._down: str | None = None
        self._down_since = 0.0
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._consumer: Any = None  # Celery's consumer of this worker (set once it is ready)
        self._paused = False

    def attach(self, consumer: Any) -> None:
        self._consumer = consumer

    @property
    def down(self) -> str | None:
        """Why Triton is unreachable (None: it is up, as far as this process knows)."""
        return self._down

    def wait_up(self, timeout_s: float) -> bool:
        return self._up.wait(timeout_s)

    def waits_for_triton(self, exc: GenerationError) -> bool:
        """Whether a failed generation is an outage: its job then waits for Triton, no attempt spent.
        Unreachable: always (Triton down, or this process's channel still reconnecting to it); a call
        cut under way: only if Triton does not answer now either."""
        lowered = exc.message.lower()
        unreachable = exc.transient and any(marker in lowered for marker in _UNREACHABLE)
        if not unreachable and not any(marker in lowered for marker in _CUT):
            return False
        return self.confirm_down(exc.message) or unreachable

    def _probe(self) -> bool:
        timeout_s = max(0.5, min(self.settings.TRITON_CONNECT_TIMEOUT_S, self.settings.TRITON_PROBE_S))
        return triton_ready(self.settings.TRITON_GRPC_URL, timeout_s)

    def confirm_down(self, reason: str) -> bool:
        """A generation could not reach Triton. If Triton does not answer a probe either, it is an
        outage: stop taking work until a probe finds it ready (True). False: Triton answers, so the
        failure was the request's own and counts as an attempt (an error repeating forever still ends)."""
        if self._down is not None:
            return True
        if self._probe():
            return False
        with self._lock:
            if self._down is not None:
                return True
            self._down, self._down_since = reason, time.monotonic()
            self._up.clear()
        log.warning(
            "Triton unreachable (%s): jobs wait for it; probing every %gs",
            reason,
            self.settings.TRITON_PROBE_S,
        )
        self._pause()
        threading.Thread(target=self._probe_until_up, name="triton-probe", daemon=True).start()
        return True

    def _probe_until_up(self) -> None:
        while not self._probe():
            time.sleep(self.settings.TRITON_PROBE_S)
        with self._lock:
            down_s = time.monotonic() - self._down_since
            self._down = None
            self._up.set()
        log.warning("Triton is ready again after %.1fs: taking jobs again", down_s)
        self._resume()

    def _pause(self) -> None:
        consumer = self._consumer
        if consumer is None or self._paused:
            return
        self._paused = True
        # Executed by the consumer's own event loop: Celery's cancel_consumer, on this worker only.
        consumer.call_soon(consumer.cancel_task_queue, self.settings.CELERY_QUEUE)

    def _resume(self) -> None:
        consumer = self._consumer
        if consumer is None or not self._paused:
            return
        self._paused = False
        consumer.call_soon(consumer.add_task_queue, self.settings.CELERY_QUEUE)


_gate: TritonGate | None = None
_gate_lock = threading.Lock()


def get_gate(settings: Settings) -> TritonGate:
    global _gate
    with _gate_lock:
        if _gate is None:
            _gate = TritonGate(settings)
        return _gate
