"""Continuous-batching loop with vLLM-shaped latency, independent of Triton.

One engine thread owns every running sequence: a step admits waiting sequences (up to
``max_num_seqs``) and advances every running sequence by one token (a new one gets its first
token from its prefill). Latency follows vLLM V1, whose scheduler always uses chunked prefill:
a step with nothing but new sequences is a prefill of ``prefill_ms``; otherwise new prompts are
batched into the decode step, which costs ``decode_ms`` plus ``prefill_ms`` times the share of
``max_num_seqs`` admitted in it (so a few late arrivals barely slow the running sequences, and a
whole batch of arrivals costs a full prefill). With both latencies at 0 a sequence is finished as soon as it is admitted,
so the simulator costs no per-token loop overhead beyond streamed responses.

The thread also calls ``on_stats`` after each step: the Triton backend updates its metrics there,
because tritonserver 2.51 crashes when pb_utils metrics are touched from several threads.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Protocol

from localtriton.engine import Plan

log = logging.getLogger(__name__)

# How often each running sequence is asked is_cancelled(), an IPC round trip (~50 µs): the asking
# fills the steps' idle time, as vLLM's backend asks between steps, so it never lengthens a step.
CANCEL_CHECK_INTERVAL_S = float(os.environ.get("LOCALTRITON_CANCEL_CHECK_S", "0.05"))
# Asked per step even when a step has no idle time left, so that a starved engine still sees cancels.
MIN_CANCEL_CHECKS_PER_STEP = 4


class Sink(Protocol):
    """Where a sequence's output goes (a Triton response sender in the backend)."""

    def is_cancelled(self) -> bool: ...

    def send(self, delta: str, n_new: int, n_total: int, finish_reason: str | None) -> None:
        """Send text/tokens; ``finish_reason`` not None means this is the final response."""

    def cancelled(self) -> None:
        """The sequence was dropped after a client cancellation: send the final response."""


@dataclass
class Sequence:
    plan: Plan
    sink: Sink
    stream: bool
    pos: int = 0  # tokens produced so far
    sent_chars: int = 0
    checked_at: float = 0.0  # last asked whether it was cancelled (monotonic)


@dataclass
class EngineStats:
    received: int = 0
    running: int = 0
    waiting: int = 0
    peak_running: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    last_cancel_at: float = 0.0  # time.monotonic() of the latest drop (a benchmark reads it)


_STOP = object()


class BatchEngine:
    def __init__(
        self,
        *,
        prefill_ms: float = 0.0,
        decode_ms: float = 0.0,
        max_num_seqs: int = 256,
        on_stats: Callable[[EngineStats], None] | None = None,
        name: str = "sim-engine",
    ) -> None:
        self.prefill_s = max(prefill_ms, 0.0) / 1000
        self.decode_s = max(decode_ms, 0.0) / 1000
        self.max_num_seqs = max_num_seqs
        self.stats = EngineStats()
        self._on_stats = on_stats
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        """Thread-safe; called from Triton's execute()."""
        self._inbox.put(seq)

    def stop(self, timeout: float = 5.0) -> None:
        self._inbox.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain(block=not self._running and not self._waiting)
                if self._stopping:
                    break
                self._step()
                self._publish()
        except Exception:  # a bug here must not hang every client: log and fail the rest
            log.exception("sim engine crashed")
        for seq in [*self._running, *self._waiting]:
            if seq.pos >= 0:
                self._drop(seq, notify=True)
        self._running.clear()
        self._waiting.clear()
        self._publish()

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is _STOP:
                self._stopping = True
                return
            assert isinstance(item, Sequence)
            self.stats.received += 1
            self._waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        started = time.monotonic()
        admitted: list[Sequence] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_num_seqs:
            seq = self._waiting.popleft()
            seq.checked_at = started
            self.stats.prompt_tokens += seq.plan.prompt_tokens
            admitted.append(seq)
        self._running.extend(admitted)
        self.stats.peak_running = max(self.stats.peak_running, len(self._running))
        if self.prefill_s == 0 and self.decode_s == 0:
            # Nothing to cancel: admitted sequences finish right now.
            for seq in self._running:
                self._advance(seq, seq.plan.completion_tokens - seq.pos)
            self._reap()
            return
        decoding = len(self._running) - len(admitted)
        if admitted and not decoding:
            # Nothing else running: a plain prefill step (its length is the time to first token).
            self._idle_until(started + self.prefill_s)
        else:
            # vLLM V1 chunked prefill: new prompts ride along in the decode step instead of
            # pausing it; the step grows with the share of the batch that is prefilling.
            extra = self.prefill_s * len(admitted) / self.max_num_seqs
            self._idle_until(started + self.decode_s + extra)
        batch = self._running  # every sequence, new or old, gets a token from this step
        for seq in batch:
            if seq.pos >= 0:  # -1 marks a dropped sequence (its client went away mid-send)
                self._advance(seq, 1)
        self._reap()

    def _advance(self, seq: Sequence, n: int) -> None:
        """Produce ``n`` tokens; a streamed sequence gets one response per token."""
        plan = seq.plan
        total = plan.completion_tokens
        if seq.pos < 0 or n <= 0:
            return
        if not seq.stream:
            new_pos = min(total, seq.pos + n)
            self.stats.generation_tokens += new_pos - seq.pos
            seq.pos = new_pos
            if seq.pos >= total:
                self._send(seq, plan.text, total, plan.finish_reason)
            return
        for _ in range(n):
            if seq.pos >= total or seq.pos < 0:
                return
            end = plan.ends[seq.pos]
            delta = plan.text[seq.sent_chars : end]
            seq.pos += 1
            seq.sent_chars = max(seq.sent_chars, end)
            self.stats.generation_tokens += 1
            self._send(seq, delta, 1, plan.finish_reason if seq.pos >= total else None)

    def _send(self, seq: Sequence, delta: str, n_new: int, finish_reason: str | None) -> None:
        try:
            seq.sink.send(delta, n_new, seq.pos, finish_reason)
        except Exception as exc:  # the client went away mid-send: drop the sequence
            log.debug("dropping sequence after send failure: %s", exc)
            self._drop(seq, notify=False)

    def _drop(self, seq: Sequence, notify: bool) -> None:
        seq.pos = -1
        self.stats.cancelled += 1
        self.stats.last_cancel_at = time.monotonic()
        if notify:
            try:
                seq.sink.cancelled()
            except Exception as exc:
                log.debug("cancel notification failed: %s", exc)

    def _idle_until(self, deadline: float) -> None:
        """The step's wait: ask the sequences that are due whether they were cancelled, then sleep."""
        self._check_cancelled(deadline)
        self._sleep_until(deadline)

    def _check_cancelled(self, deadline: float) -> None:
        due = time.monotonic() - CANCEL_CHECK_INTERVAL_S
        asked = dropped = 0
        # Longest unasked first: whoever a short step left out comes first in the next one.
        for seq in sorted(self._running, key=attrgetter("checked_at")):
            if seq.checked_at > due:
                break
            if seq.pos < 0:
                continue
            if asked >= MIN_CANCEL_CHECKS_PER_STEP and time.monotonic() >= deadline:
                break
            asked += 1
            seq.checked_at = time.monotonic()
            try:
                cancelled = seq.sink.is_cancelled()
            except Exception:
                cancelled = True
            if cancelled:
                self._drop(seq, notify=True)
                dropped += 1
        if dropped:  # gone now, in the metrics too, not after the step
            self._reap()
            self._publish()

    def _reap(self) -> None:
        keep: list[Sequence] = []
        for seq in self._running:
            if seq.pos < 0:
                continue
            if seq.pos >= seq.plan.completion_tokens:
                self.stats.finished += 1
            else:
                keep.append(seq)
        self._running = keep

    def _sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _publish(self) -> None:
        self.stats.running = len(self._running)
        self.stats.waiting = len(self._waiting)
        if self._on_stats is not None:
            try:
                self._on_stats(self.stats)
            except Exception:
                log.exception("on_stats failed")
