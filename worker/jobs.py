"""One job, as a coroutine on the runtime's loop: claim it, generate, write the outcome once.

The Celery task (worker/tasks.py) only starts it. The hot path (claim, generation, outcome) never
leaves the loop but for the job store's batches; the rare paths that block (a release, a stopped
job's partial output, a message sent again, waiting out a Triton outage) run in the loop's executor.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable

from app.config import Settings
from app.notify import publish_done
from app.repositories import results as repo
from app.triton.inference import Generation, GenerationError
from worker.job_store import ClaimedJob, Outcome, final_notice, get_database, get_store
from worker.metrics import worker_metrics
from worker.outage import get_gate
from worker.runtime import InferenceRuntime, Stopped

log = logging.getLogger(__name__)

# Sampling parameters forwarded to vLLM (validated by the API when the job was submitted).
_FORWARDED_PARAMS = (
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "image",
)

Ring = Callable[[list[uuid.UUID]], object]


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: attempt n waits between half and all of min(max, base * 2^(n-1))."""
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def sampling_parameters(params: dict[str, object]) -> dict[str, object]:
    sent = {k: params[k] for k in _FORWARDED_PARAMS if k in params and params[k] not in (None, [])}
    return sent


async def run_job(settings: Settings, runtime: InferenceRuntime, rid: uuid.UUID, ring: Ring) -> None:
    """Run the job `rid` (its message was received): `ring` sends a job's message again."""
    gate = get_gate(settings)
    if gate.down is not None and not await asyncio.to_thread(gate.wait_up, settings.TRITON_PROBE_S):
        # Back to Redis untouched: this worker's consumer is paused until Triton is back.
        await asyncio.to_thread(ring, [rid])
        return
    store = get_store(settings)
    job = await store.aclaim(rid)
    metrics = worker_metrics()
    if job is None:
        log.info("result %s is finished or held by another worker; skipping", rid)
        metrics.skipped.inc()
        return
    metrics.running.inc()
    try:
        outcome = await _run_claimed(settings, runtime, job, ring)
    finally:
        metrics.running.dec()
    metrics.job_ended(job.model, outcome)


async def _run_claimed(settings: Settings, runtime: InferenceRuntime, job: ClaimedJob, ring: Ring) -> str:
    """Run a claimed job to its end; how it ended (worker/metrics.py's OUTCOMES)."""
    rid, store = job.result_id, get_store(settings)
    if runtime.was_cancelled(str(rid)):
        log.info("result %s was cancelled before it started", rid)
        await asyncio.to_thread(
            record_stop, settings, job, Stopped("cancelled", Generation("", None, None, None))
        )
        return "cancelled"
    if job.seconds_left is not None and job.seconds_left <= 0:
        stop = Stopped("deadline", Generation("", None, None, None))
        await asyncio.to_thread(record_stop, settings, job, stop)
        return "deadline"
    sink = await runtime.open_stream(rid, job.ran_before) if job.params.get("stream") else None
    started = time.monotonic()
    try:
        generation = await runtime.generate(
            job.model,
            job.prompt,
            sampling_parameters(job.params),
            request_id=f"{rid}-{job.attempts}",
            job_key=str(rid),
            stream=sink,
            timeout_s=job.seconds_left,
        )
    except Stopped as stop:
        if stop.reason == "shutdown":  # its stream goes on with the next run (a restart marker)
            await asyncio.to_thread(_hand_back, settings, job, ring)
            return "requeued"
        await asyncio.to_thread(record_stop, settings, job, stop)
        if sink is not None:
            sink.finish("cancelled")
        return stop.reason
    except GenerationError as exc:
        ended = await _failed(settings, job, exc, ring)
        if ended == "failed" and sink is not None:
            sink.finish("failed")  # (a job to be run again goes on with its stream then)
        return ended
    except Exception as exc:
        # A bug on our side must still end the job with a reason rather than leave it pending.
        log.exception("result %s: unexpected error", rid)
        await store.afail(rid, f"internal worker error: {type(exc).__name__}: {exc}")
        if sink is not None:
            sink.finish("failed")
        return "failed"

    worker_metrics().generated(
        job.model, time.monotonic() - started, generation.prompt_tokens, generation.completion_tokens
    )
    outcome = Outcome(
        output=generation.text,
        finish_reason=generation.finish_reason,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
    )
    if await store.acomplete(rid, outcome):
        if sink is not None:
            sink.finish("completed")
        return "completed"
    if sink is not None:
        # Cancelled as it ended: the row keeps the text its stream showed, as a cancel mid-way does.
        await asyncio.to_thread(record_stop, settings, job, Stopped("cancelled", generation))
        sink.finish("cancelled")
        return "cancelled"
    log.info("result %s was already finished; the duplicate outcome was dropped", rid)
    return "dropped"


async def _failed(settings: Settings, job: ClaimedJob, exc: GenerationError, ring: Ring) -> str:
    """A generation that failed: wait for Triton (an outage: "requeued"), try again later ("retried"),
    or fail the job ("failed")."""
    rid, store = job.result_id, get_store(settings)
    if await asyncio.to_thread(get_gate(settings).waits_for_triton, exc):  # an outage: no attempt spent
        await asyncio.to_thread(store.release, rid, f"waiting for Triton: {exc.message}", spend_attempt=False)
        await asyncio.to_thread(ring, [rid])
        return "requeued"
    if exc.transient and job.attempts < settings.JOB_MAX_ATTEMPTS:
        delay = backoff_s(job.attempts, settings.RETRY_BACKOFF_BASE_S, settings.RETRY_BACKOFF_MAX_S)
        note = f"attempt {job.attempts} failed, retrying in {delay:.1f}s: {exc.message}"
        log.warning("result %s: %s", rid, note)
        await asyncio.to_thread(store.release, rid, note)
        # The message goes back after the delay; if this process dies meanwhile, the sweeper sends it.
        asyncio.get_running_loop().call_later(delay, _send_again, ring, rid)
        return "retried"
    reason = exc.message if not exc.transient else f"gave up after {job.attempts} attempts: {exc.message}"
    await store.afail(rid, reason)
    log.info("result %s failed: %s", rid, reason)
    return "failed"


def _hand_back(settings: Settings, job: ClaimedJob, ring: Ring) -> None:
    """This worker stops before the job's end: back to the queue, its attempt not spent, for another
    worker to run from the start. What fails here is left to the sweeper (a lapsed lease, a lost message)."""
    rid = job.result_id
    try:
        get_store(settings).release(rid, "its worker stopped; sent to another worker", spend_attempt=False)
        ring([rid])
    except Exception as exc:
        log.warning("result %s: could not hand it back (%s); the sweeper will send it again", rid, exc)
        return
    log.info("result %s: handed back to the queue (this worker is stopping)", rid)


def _send_again(ring: Ring, rid: uuid.UUID) -> None:
    def send() -> None:
        try:
            ring([rid])
        except Exception as exc:  # Redis down: the sweeper sends it once it finds the job waiting
            log.warning("result %s: could not send it again (%s); the sweeper will", rid, exc)

    asyncio.get_running_loop().run_in_executor(None, send)


def record_stop(settings: Settings, job: ClaimedJob, stop: Stopped) -> None:
    """Keep what a stopped generation had produced. Cancelled: the row is final already (the API
    made it so); past its own deadline: it ends `cancelled` here, saying why."""
    partial = stop.partial
    values = (partial.text or None, partial.prompt_tokens, partial.completion_tokens)
    if stop.reason == "cancelled" and not job.params.get("stream"):
        return  # nothing to show before its end: the cancel made the row final already
    # A streamed one is recorded even with nothing produced yet: its cancel waits for this row.
    with get_database(settings).connection() as conn:
        if stop.reason == "cancelled":
            row = repo.record_stopped(conn, job.result_id, *values)
        else:
            timeout_s = job.params.get("timeout_s")
            error = f"deadline passed: not finished within timeout_s = {timeout_s} s of its submission"
            row = repo.end_past_deadline(conn, job.result_id, error, *values)
    log.info("result %s: stopped (%s) after %d characters", job.result_id, stop.reason, len(partial.text))
    if row is not None:
        publish_done(settings, [final_notice(job.result_id, row)])
