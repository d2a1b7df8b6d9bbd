"""Celery tasks: run one job, and sweep for lost or expired ones."""

from __future__ import annotations

import concurrent.futures
import logging
import random
import uuid

from celery import Task

from app.config import get_settings
from app.notify import publish_done
from app.queue import RUN_JOB_TASK, SWEEP_TASK
from app.repositories import idempotency
from app.repositories import results as repo
from app.services.idempotency import RETENTION_S
from app.triton.inference import GenerationError
from worker.cancels import get_listener
from worker.celery_app import celery_app, job_queue
from worker.job_store import Outcome, get_database, get_store
from worker.runtime import get_runtime

log = logging.getLogger(__name__)

# Sampling parameters forwarded to vLLM (validated by the API when the job was submitted).
_FORWARDED_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed", "ignore_eos")


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
    store = get_store(settings)
    job = store.claim(rid)
    if job is None:
        log.info("result %s is finished or held by another worker; skipping", rid)
        return

    runtime = get_runtime(settings)
    cancels = get_listener(settings, runtime)
    if cancels.was_cancelled(str(rid)):
        log.info("result %s was cancelled before it started", rid)
        return
    try:
        generation = runtime.generate(
            job.model,
            job.prompt,
            sampling_parameters(job.params),
            request_id=f"{rid}-{job.attempts}",
            job_key=str(rid),
        )
    except concurrent.futures.CancelledError:
        log.info("result %s: generation aborted (the job was cancelled)", rid)  # the row is final already
        return
    except GenerationError as exc:
        if exc.transient and job.attempts < settings.JOB_MAX_ATTEMPTS:
            delay = backoff_s(job.attempts, settings.RETRY_BACKOFF_BASE_S, settings.RETRY_BACKOFF_MAX_S)
            note = f"attempt {job.attempts} failed, retrying in {delay:.1f}s: {exc.message}"
            log.warning("result %s: %s", rid, note)
            with get_database(settings).connection() as conn:
                repo.release(conn, rid, note)
            raise self.retry(countdown=delay) from exc
        reason = exc.message if not exc.transient else f"gave up after {job.attempts} attempts: {exc.message}"
        store.fail(rid, reason)
        log.info("result %s failed: %s", rid, reason)
        return
    except Exception as exc:
        # A bug on our side must still end the job with a reason rather than leave it pending.
        log.exception("result %s: unexpected error", rid)
        store.fail(rid, f"internal worker error: {type(exc).__name__}: {exc}")
        return

    outcome = Outcome(
        output=generation.text,
        finish_reason=generation.finish_reason,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
    )
    if not store.complete(rid, outcome):
        log.info("result %s was already finished; the duplicate outcome was dropped", rid)


@celery_app.task(name=SWEEP_TASK)
def sweep() -> dict[str, int]:
    """Re-send jobs whose message was lost, and fail those past their deadline."""
    settings = get_settings()
    with get_database(settings).connection() as conn:
        expired = repo.fail_expired(conn, deadline_s=settings.JOB_DEADLINE_S)
        lost = repo.requeue_candidates(
            conn,
            requeue_after_s=settings.SWEEP_REQUEUE_AFTER_S,
            running_stale_after_s=settings.TRITON_REQUEST_TIMEOUT_S + 60,
            limit=1000,
        )
        idempotency.forget_old(conn, RETENTION_S)
    publish_done(settings, expired)
    if lost:
        job_queue().ring(lost)
    if expired or lost:
        log.warning("sweep: re-enqueued %d lost jobs, failed %d past their deadline", len(lost), len(expired))
    return {"requeued": len(lost), "expired": len(expired)}
