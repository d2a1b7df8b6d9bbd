"""Celery tasks: run one job (the sweeper is a thread of every worker: worker/sweeper.py)."""

from __future__ import annotations

import logging
import random
import uuid

from celery import Task

from app.config import Settings, get_settings
from app.notify import publish_done
from app.queue import RUN_JOB_TASK
from app.repositories import results as repo
from app.triton.inference import Generation, GenerationError
from worker.celery_app import celery_app, job_queue
from worker.job_store import ClaimedJob, Outcome, final_notice, get_database, get_store
from worker.outage import get_gate
from worker.runtime import Stopped, get_runtime

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


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: attempt n waits between half and all of min(max, base * 2^(n-1))."""
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def sampling_parameters(params: dict[str, object]) -> dict[str, object]:
    sent = {k: params[k] for k in _FORWARDED_PARAMS if k in params and params[k] not in (None, [])}
    return sent


@celery_app.task(name=RUN_JOB_TASK, bind=True, max_retries=None)
def run_job(self: Task, result_id: str) -> None:  # type: ignore[type-arg]
    settings = get_settings()
    rid = uuid.UUID(result_id)
    gate = get_gate(settings)
    if gate.down is not None and not gate.wait_up(settings.TRITON_PROBE_S):
        job_queue().ring([rid])  # back to Redis untouched: this worker stops consuming until Triton is back
        return
    store = get_store(settings)
    job = store.claim(rid)
    if job is None:
        log.info("result %s is finished or held by another worker; skipping", rid)
        return

    runtime = get_runtime(settings)  # cancels reach this process from its creation on
    if runtime.was_cancelled(str(rid)):
        log.info("result %s was cancelled before it started", rid)
        return
    if job.seconds_left is not None and job.seconds_left <= 0:
        record_stop(settings, job, Stopped("deadline", Generation("", None, None, None)))
        return
    sink = runtime.open_stream(rid, job.attempts) if job.params.get("stream") else None
    try:
        generation = runtime.generate(
            job.model,
            job.prompt,
            sampling_parameters(job.params),
            request_id=f"{rid}-{job.attempts}",
            job_key=str(rid),
            stream=sink,
            timeout_s=job.seconds_left,
        )
    except Stopped as stop:
        record_stop(settings, job, stop)
        if sink is not None:
            runtime.end_stream(sink, "cancelled")
        return
    except GenerationError as exc:
        if gate.waits_for_triton(exc):  # an outage: the job waits for Triton, no attempt spent
            store.release(rid, f"waiting for Triton: {exc.message}", spend_attempt=False)
            job_queue().ring([rid])
            return
        if exc.transient and job.attempts < settings.JOB_MAX_ATTEMPTS:
            delay = backoff_s(job.attempts, settings.RETRY_BACKOFF_BASE_S, settings.RETRY_BACKOFF_MAX_S)
            note = f"attempt {job.attempts} failed, retrying in {delay:.1f}s: {exc.message}"
            log.warning("result %s: %s", rid, note)
            store.release(rid, note)
            raise self.retry(countdown=delay) from exc
        reason = exc.message if not exc.transient else f"gave up after {job.attempts} attempts: {exc.message}"
        store.fail(rid, reason)
        log.info("result %s failed: %s", rid, reason)
        if sink is not None:
            runtime.end_stream(sink, "failed")
        return
    except Exception as exc:
        # A bug on our side must still end the job with a reason rather than leave it pending.
        log.exception("result %s: unexpected error", rid)
        store.fail(rid, f"internal worker error: {type(exc).__name__}: {exc}")
        if sink is not None:
            runtime.end_stream(sink, "failed")
        return

    outcome = Outcome(
        output=generation.text,
        finish_reason=generation.finish_reason,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
    )
    if not store.complete(rid, outcome):
        log.info("result %s was already finished; the duplicate outcome was dropped", rid)
    if sink is not None:
        runtime.end_stream(sink, "completed")


def record_stop(settings: Settings, job: ClaimedJob, stop: Stopped) -> None:
    """Keep what a stopped generation had produced. Cancelled: the row is final already (the API
    made it so); past its own deadline: it ends `cancelled` here, saying why."""
    partial = stop.partial
    values = (partial.text or None, partial.prompt_tokens, partial.completion_tokens)
    if stop.reason == "cancelled" and not partial.text and not partial.completion_tokens:
        return  # nothing produced (or not streamed): the row stays as the cancel left it
    with get_database(settings).connection() as conn:
        if stop.reason == "cancelled":
            row = repo.record_cancelled(conn, job.result_id, *values)
        else:
            timeout_s = job.params.get("timeout_s")
            error = f"deadline passed: not finished within timeout_s = {timeout_s} s of its submission"
            row = repo.end_past_deadline(conn, job.result_id, error, *values)
    log.info("result %s: stopped (%s) after %d characters", job.result_id, stop.reason, len(partial.text))
    if row is not None:
        publish_done(settings, [final_notice(job.result_id, row)])
