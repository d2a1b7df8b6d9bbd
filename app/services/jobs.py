"""The job's life in the database: claim, release for a retry, and the terminal writes.

The batched claim/complete/fail statements are the worker's per-job hot path and run on a
psycopg connection; the rest (retries, the sweeper) are text statements on a SQLAlchemy one.

Every write that ends a job is conditional on `status = 'pending'`, so a redelivered or
duplicated task can never overwrite a finished result. `started_at` is the claim: a second
copy of the task skips a row that another worker is running, unless that claim is stale.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import Connection, text


@dataclass(frozen=True)
class ClaimedJob:
    result_id: uuid.UUID
    model: str
    params: dict[str, Any]
    attempts: int
    prompt: str


@dataclass(frozen=True)
class Outcome:
    """What a finished generation writes."""

    output: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


# Each statement takes many jobs at once: the worker batches the writes of all its threads.
# They run on a plain psycopg connection in autocommit (worker/job_store.py): one round trip per
# statement, no BEGIN/COMMIT, no SQLAlchemy statement handling (the worker's per-job hot path).
_CLAIM = """
    UPDATE result AS r
       SET started_at = now(), attempts = r.attempts + 1, updated_at = now()
      FROM context AS c
     WHERE r.id = ANY(%(ids)s::uuid[]) AND c.id = r.context_id AND r.status = 'pending'
       AND (r.started_at IS NULL OR r.started_at < now() - make_interval(secs => %(stale_after)s))
    RETURNING r.id, r.model, r.params, r.attempts, c.content
"""
_COMPLETE = """
    UPDATE result AS r
       SET status = 'completed', output = v.output, error = NULL, finish_reason = v.finish_reason,
           prompt_tokens = v.prompt_tokens, completion_tokens = v.completion_tokens,
           finished_at = now(), updated_at = now()
      FROM unnest(%(ids)s::uuid[], %(outputs)s::text[], %(reasons)s::text[],
                  %(prompt_tokens)s::integer[], %(completion_tokens)s::integer[])
           AS v(id, output, finish_reason, prompt_tokens, completion_tokens)
     WHERE r.id = v.id AND r.status = 'pending'
    RETURNING r.*
"""
_FAIL = """
    UPDATE result AS r
       SET status = 'failed', error = v.error, finished_at = now(), updated_at = now()
      FROM unnest(%(ids)s::uuid[], %(errors)s::text[]) AS v(id, error)
     WHERE r.id = v.id AND r.status = 'pending'
    RETURNING r.*
"""

FinalRows = dict[uuid.UUID, dict[str, Any]]


def claim_many(
    conn: psycopg.Connection[Any], result_ids: list[uuid.UUID], stale_after_s: float
) -> dict[uuid.UUID, ClaimedJob]:
    """Take the jobs that are pending and that nobody holds a fresh claim on."""
    rows = conn.execute(_CLAIM, {"ids": result_ids, "stale_after": stale_after_s}).fetchall()
    return {
        rid: ClaimedJob(result_id=rid, model=model, params=params, attempts=attempts, prompt=content)
        for rid, model, params, attempts, content in rows
    }


def release(conn: Connection, result_id: uuid.UUID, error: str) -> bool:
    """Give the claim back before a retry; `error` tells pollers why it is taking longer."""
    updated = conn.execute(
        text(
            "UPDATE result SET started_at = NULL, error = :error, updated_at = now() "
            "WHERE id = :id AND status = 'pending'"
        ),
        {"id": result_id, "error": error},
    )
    return bool(updated.rowcount)


def complete_many(conn: psycopg.Connection[Any], outcomes: dict[uuid.UUID, Outcome]) -> FinalRows:
    """Write each outcome once. Returned: the rows that were still pending, as now written
    (the completion notice carries them to the API's waiters)."""
    if not outcomes:
        return {}
    ids = list(outcomes)
    cursor = conn.cursor(row_factory=dict_row)
    rows = cursor.execute(
        _COMPLETE,
        {
            "ids": ids,
            "outputs": [outcomes[i].output for i in ids],
            "reasons": [outcomes[i].finish_reason for i in ids],
            "prompt_tokens": [outcomes[i].prompt_tokens for i in ids],
            "completion_tokens": [outcomes[i].completion_tokens for i in ids],
        },
    ).fetchall()
    return {row["id"]: row for row in rows}


def fail_many(conn: psycopg.Connection[Any], errors: dict[uuid.UUID, str]) -> FinalRows:
    """Like `complete_many`, for jobs that end with an error."""
    if not errors:
        return {}
    ids = list(errors)
    cursor = conn.cursor(row_factory=dict_row)
    rows = cursor.execute(_FAIL, {"ids": ids, "errors": [errors[i] for i in ids]}).fetchall()
    return {row["id"]: row for row in rows}


def requeue_candidates(
    conn: Connection, *, requeue_after_s: float, running_stale_after_s: float, limit: int
) -> list[uuid.UUID]:
    """Pending jobs whose message was probably lost: never started and untouched for a while, or
    claimed by a worker that has not finished within the longest possible run. Touching
    `updated_at` keeps the next sweep from sending them again right away."""
    rows = conn.execute(
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


def fail_expired(conn: Connection, *, deadline_s: float) -> list[uuid.UUID]:
    """Nothing stays pending forever: past the deadline a job fails, keeping its last error."""
    rows = conn.execute(
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
