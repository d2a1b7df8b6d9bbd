"""SQL of the `result` table: one row per job.

The API inserts and reads rows (async connections); the worker claims them and writes outcomes
(sync connections, each statement taking a batch of jobs). Every write that ends a job is
conditional on `status = 'pending'`: a redelivered or duplicated task never overwrites a
finished result. `started_at` is the claim: a second copy of the task skips a row another
worker is running, unless that claim is stale.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from app.db import AsyncConnection, Connection
from app.repositories.listing import newest_first

# ---------------------------------------------------------------- API side

# One statement checks that the tenant's context exists and inserts (no round trip to load the prompt).
_SUBMIT = """
    INSERT INTO result (id, tenant, context_id, model, params, prompt)
    SELECT %(id)s, c.tenant, c.id, %(model)s, %(params)s, %(prompt)s FROM context AS c
     WHERE c.id = %(context_id)s AND c.tenant = %(tenant)s
    RETURNING created_at
"""
# Counting stops at the cap: the answer is only compared with it.
_COUNT_PENDING = """
    SELECT count(*) FROM (SELECT 1 FROM result WHERE tenant = %(tenant)s AND status = 'pending' LIMIT %(cap)s) AS p
"""
# `tenant` NULL: any tenant's (an admin's read).
_GET = "SELECT * FROM result WHERE id = %(id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)"


async def insert_for_context(
    conn: AsyncConnection,
    *,
    result_id: uuid.UUID,
    tenant: str,
    context_id: uuid.UUID,
    model: str,
    params: dict[str, Any],
    prompt: str | None = None,
) -> datetime | None:
    """The new row's created_at; None when the tenant has no such context (nothing inserted).
    `prompt`: what the model gets when it is not the context's content."""
    values = {
        "id": result_id,
        "tenant": tenant,
        "context_id": context_id,
        "model": model,
        "params": Jsonb(params),
        "prompt": prompt,
    }
    row = await (await conn.execute(_SUBMIT, values)).fetchone()
    return None if row is None else row[0]


# Conditional like every write that ends a job: only a pending job is cancelled.
_CANCEL = """
    UPDATE result SET status = 'cancelled', error = 'cancelled by the client', finished_at = now(), updated_at = now()
     WHERE id = %(id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s) AND status = 'pending'
    RETURNING *
"""


async def cancel(conn: AsyncConnection, result_id: uuid.UUID, tenant: str | None) -> dict[str, Any] | None:
    """The row as cancelled now; None when it was not pending (or is not the tenant's)."""
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(_CANCEL, {"id": result_id, "tenant": tenant})).fetchone()


async def count_pending(conn: AsyncConnection, tenant: str, cap: int) -> int:
    row = await (await conn.execute(_COUNT_PENDING, {"tenant": tenant, "cap": cap})).fetchone()
    return int(row[0]) if row else 0


async def get(conn: AsyncConnection, result_id: uuid.UUID, tenant: str | None) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(_GET, {"id": result_id, "tenant": tenant})).fetchone()


async def page(
    conn: AsyncConnection, *, filters: dict[str, Any], cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    return await newest_first(conn, "result", sql.SQL("*"), filters, cursor=cursor, limit=limit)


# ---------------------------------------------------------------- worker side

_CLAIM = """
    UPDATE result AS r
       SET started_at = now(), attempts = r.attempts + 1, updated_at = now()
      FROM context AS c
     WHERE r.id = ANY(%(ids)s::uuid[]) AND c.id = r.context_id AND r.status = 'pending'
       AND (r.started_at IS NULL OR r.started_at < now() - make_interval(secs => %(stale_after)s))
    RETURNING r.id, r.model, r.params, r.attempts, COALESCE(r.prompt, c.content)
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
_RELEASE = """
    UPDATE result SET started_at = NULL, error = %(error)s, updated_at = now()
     WHERE id = %(id)s AND status = 'pending'
"""
# Touching `updated_at` keeps the next sweep from sending the same rows again right away.
_REQUEUE_CANDIDATES = """
    UPDATE result SET updated_at = now()
     WHERE id IN (
        SELECT id FROM result
         WHERE status = 'pending'
           AND ((started_at IS NULL AND updated_at < now() - make_interval(secs => %(requeue_after)s))
                OR started_at < now() - make_interval(secs => %(running_stale)s))
         ORDER BY created_at
         LIMIT %(limit)s
         FOR UPDATE SKIP LOCKED)
    RETURNING id
"""
_FAIL_EXPIRED = """
    UPDATE result
       SET status = 'failed', finished_at = now(), updated_at = now(),
           error = 'deadline exceeded: still pending ' || round(%(deadline)s) || ' s after submission'
                   || COALESCE(' (last error: ' || error || ')', '')
     WHERE status = 'pending' AND created_at < now() - make_interval(secs => %(deadline)s)
    RETURNING id
"""

# id -> the final row as written (all columns)
FinalRows = dict[uuid.UUID, dict[str, Any]]
# id -> (model, params, attempts, prompt)
ClaimedRows = dict[uuid.UUID, tuple[str, dict[str, Any], int, str]]


def claim_many(conn: Connection, result_ids: list[uuid.UUID], stale_after_s: float) -> ClaimedRows:
    """Take the jobs that are pending and that nobody holds a fresh claim on."""
    rows = conn.execute(_CLAIM, {"ids": result_ids, "stale_after": stale_after_s}).fetchall()
    return {rid: (model, params, attempts, content) for rid, model, params, attempts, content in rows}


def complete_many(
    conn: Connection, outcomes: dict[uuid.UUID, tuple[str, str | None, int | None, int | None]]
) -> FinalRows:
    """Write each (output, finish_reason, prompt_tokens, completion_tokens) once. Returned: the rows
    that were still pending, as now written."""
    if not outcomes:
        return {}
    ids = list(outcomes)
    columns = list(zip(*(outcomes[i] for i in ids), strict=True))
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute(
        _COMPLETE,
        {
            "ids": ids,
            "outputs": list(columns[0]),
            "reasons": list(columns[1]),
            "prompt_tokens": list(columns[2]),
            "completion_tokens": list(columns[3]),
        },
    ).fetchall()
    return {row["id"]: row for row in rows}


def fail_many(conn: Connection, errors: dict[uuid.UUID, str]) -> FinalRows:
    """Like `complete_many`, for jobs that end with an error."""
    if not errors:
        return {}
    ids = list(errors)
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute(_FAIL, {"ids": ids, "errors": [errors[i] for i in ids]}).fetchall()
    return {row["id"]: row for row in rows}


def release(conn: Connection, result_id: uuid.UUID, error: str) -> bool:
    """Give the claim back before a retry; `error` tells pollers why it is taking longer."""
    return conn.execute(_RELEASE, {"id": result_id, "error": error}).rowcount > 0


def requeue_candidates(
    conn: Connection, *, requeue_after_s: float, running_stale_after_s: float, limit: int
) -> list[uuid.UUID]:
    """Pending jobs whose message was probably lost: never started and untouched for a while, or
    claimed by a worker that has not finished within the longest possible run."""
    params = {"requeue_after": requeue_after_s, "running_stale": running_stale_after_s, "limit": limit}
    return [row[0] for row in conn.execute(_REQUEUE_CANDIDATES, params).fetchall()]


def fail_expired(conn: Connection, *, deadline_s: float) -> list[uuid.UUID]:
    """Nothing stays pending forever: past the deadline a job fails, keeping its last error."""
    return [row[0] for row in conn.execute(_FAIL_EXPIRED, {"deadline": deadline_s}).fetchall()]
