"""The job's life in the database: claim, release for a retry, and the terminal writes.

Every write that ends a job is conditional on `status = 'pending'`, so a redelivered or
duplicated task can never overwrite a finished result. `started_at` is the claim: a second
copy of the task skips a row that another worker is running, unless that claim is stale.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class ClaimedJob:
    result_id: uuid.UUID
    model: str
    params: dict[str, Any]
    attempts: int
    prompt: str


_CLAIM = text(
    """
    UPDATE result AS r
       SET started_at = now(), attempts = r.attempts + 1, updated_at = now()
      FROM context AS c
     WHERE r.id = :id AND c.id = r.context_id AND r.status = 'pending'
       AND (r.started_at IS NULL OR r.started_at < now() - make_interval(secs => :stale_after))
    RETURNING r.model, r.params, r.attempts, c.content
    """
)


def claim(session: Session, result_id: uuid.UUID, stale_after_s: float) -> ClaimedJob | None:
    """Take the job if it is pending and nobody holds a fresh claim on it."""
    row = session.execute(_CLAIM, {"id": result_id, "stale_after": stale_after_s}).one_or_none()
    if row is None:
        return None
    return ClaimedJob(
        result_id=result_id, model=row.model, params=row.params, attempts=row.attempts, prompt=row.content
    )


def release(session: Session, result_id: uuid.UUID, error: str) -> bool:
    """Give the claim back before a retry; `error` tells pollers why it is taking longer."""
    updated = session.execute(
        text(
            "UPDATE result SET started_at = NULL, error = :error, updated_at = now() "
            "WHERE id = :id AND status = 'pending'"
        ),
        {"id": result_id, "error": error},
    )
    return bool(updated.rowcount)  # type: ignore[attr-defined]


def complete(
    session: Session,
    result_id: uuid.UUID,
    *,
    output: str,
    finish_reason: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
) -> bool:
    """Write the outcome once; False when the row had already ended (a duplicate task)."""
    updated = session.execute(
        text(
            """
            UPDATE result
               SET status = 'completed', output = :output, error = NULL, finish_reason = :finish_reason,
                   prompt_tokens = :prompt_tokens, completion_tokens = :completion_tokens,
                   finished_at = now(), updated_at = now()
             WHERE id = :id AND status = 'pending'
            """
        ),
        {
            "id": result_id,
            "output": output,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        },
    )
    return bool(updated.rowcount)  # type: ignore[attr-defined]


def fail(session: Session, result_id: uuid.UUID, error: str) -> bool:
    updated = session.execute(
        text(
            "UPDATE result SET status = 'failed', error = :error, finished_at = now(), updated_at = now() "
            "WHERE id = :id AND status = 'pending'"
        ),
        {"id": result_id, "error": error},
    )
    return bool(updated.rowcount)  # type: ignore[attr-defined]


def requeue_candidates(
    session: Session, *, requeue_after_s: float, running_stale_after_s: float, limit: int
) -> list[uuid.UUID]:
    """Pending jobs whose message was probably lost: never started and untouched for a while, or
    claimed by a worker that has not finished within the longest possible run. Touching
    `updated_at` keeps the next sweep from sending them again right away."""
    rows = session.execute(
        text(
            """
            UPDATE result SET updated_at = now()
             WHERE id IN (
                SELECT id FROM result
                 WHERE status = 'pending'
                   AND ((started_at IS NULL AND updated_at < now() - make_interval(secs => :requeue_after))
                        OR started_at < now() - make_interval(secs => :running_stale))
                 ORDER BY created_at
                 LIMIT :limit
                 FOR UPDATE SKIP LOCKED)
            RETURNING id
            """
        ),
        {"requeue_after": requeue_after_s, "running_stale": running_stale_after_s, "limit": limit},
    )
    return [row.id for row in rows]


def fail_expired(session: Session, *, deadline_s: float) -> list[uuid.UUID]:
    """Nothing stays pending forever: past the deadline a job fails, keeping its last error."""
    rows = session.execute(
        text(
            """
            UPDATE result
               SET status = 'failed', finished_at = now(), updated_at = now(),
                   error = 'deadline exceeded: still pending ' || round(:deadline) || ' s after submission'
                           || COALESCE(' (last error: ' || error || ')', '')
             WHERE status = 'pending' AND created_at < now() - make_interval(secs => :deadline)
            RETURNING id
            """
        ),
        {"deadline": deadline_s},
    )
    return [row.id for row in rows]
