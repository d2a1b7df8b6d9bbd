"""SQL of the `result` table: one row per job.

The API inserts and reads rows (async connections); the worker claims them and writes outcomes
(sync connections, each statement taking a batch of jobs). Every write that ends a job is
conditional on `status = 'pending'`: a redelivered or duplicated task never overwrites a
finished result. The claim is a lease (`lease_owner`, `lease_until`) its worker renews: a second
copy of the task skips a row another worker holds, and a lapsed lease is taken over.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from app.db import AsyncConnection, Connection
from app.repositories.listing import newest_first


def _json_rows(rows: Iterable[dict[str, Any]]) -> str:
    """A batch's rows as one JSON document (`jsonb_to_recordset`): psycopg dumps an array
    parameter element by element in Python, which cost a batched statement most of its CPU."""
    return json.dumps(list(rows), separators=(",", ":"))


def storable(text: str | None) -> str | None:
    """Text as Postgres can store it: its text type cannot hold NUL, which a model may generate."""
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


# ---------------------------------------------------------------- API side

# One statement checks that each row's context exists for its tenant and inserts the rows (no
# round trip to load a prompt); concurrent submits share it (app/services/results.py).
_SUBMIT = """
    INSERT INTO result (id, tenant, context_id, model, params, prompt, deadline_at)
    SELECT r.id, c.tenant, c.id, r.model, r.params, r.prompt,
           clock_timestamp() + make_interval(secs => r.timeout_s)
      FROM jsonb_to_recordset(%(rows)s::jsonb)
           AS r(id uuid, tenant text, context_id uuid, model text, params jsonb, prompt text, timeout_s float8)
      JOIN context AS c ON c.id = r.context_id AND c.tenant = r.tenant
    RETURNING id, created_at
"""
# Counting stops at the cap: the answer is only compared with it.
_COUNT_PENDING = """
    SELECT count(*) FROM (SELECT 1 FROM result WHERE tenant = %(tenant)s AND status = 'pending' LIMIT %(cap)s) AS p
"""
# `tenant` NULL: any tenant's (an admin's read).
_GET = "SELECT * FROM result WHERE id = %(id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)"


@dataclass(frozen=True)
class NewResult:
    """A pending result to insert. `prompt`: what the model gets when it is not the context's
    content; `timeout_s`: the job's own deadline."""

    id: uuid.UUID
    tenant: str
    context_id: uuid.UUID
    model: str
    params: dict[str, Any]
    prompt: str | None = None
    timeout_s: float | None = None


async def insert_for_contexts(conn: AsyncConnection, rows: list[NewResult]) -> dict[uuid.UUID, datetime]:
    """Each inserted row's created_at, by id; a row whose context its tenant does not have is not
    inserted (and not in the answer)."""
    batch = _json_rows(
        {
            "id": str(r.id),
            "tenant": r.tenant,
            "context_id": str(r.context_id),
            "model": r.model,
            "params": r.params,
            "prompt": r.prompt,
            "timeout_s": r.timeout_s,
        }
        for r in rows
    )
    values = {"rows": batch}
    # A context purged between the statement's read of it and its key check fails the statement;
    # run again, it no longer sees that context (a 404). Each retry follows one context gone.
    for _ in range(len(rows)):
        try:
            return await _submit(conn, values)
        except psycopg.errors.ForeignKeyViolation:
            continue
    return await _submit(conn, values)


async def _submit(conn: AsyncConnection, values: dict[str, str]) -> dict[uuid.UUID, datetime]:
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:  # autocommit: no round trip more
        return {row[0]: row[1] for row in await (await conn.execute(_SUBMIT, values)).fetchall()}
    async with conn.transaction():  # a savepoint: a failed statement leaves the caller's transaction usable
        return {row[0]: row[1] for row in await (await conn.execute(_SUBMIT, values)).fetchall()}


# A prompt the call brings with it (OpenAI's API): its context and its choices' rows in one statement.
_INSERT_WITH_CONTEXT = """
    WITH c AS (
        INSERT INTO context (id, tenant, content) VALUES (%(context_id)s, %(tenant)s, %(content)s)
        RETURNING id, tenant
    )
    INSERT INTO result (id, tenant, context_id, model, params, prompt)
    SELECT r.id, c.tenant, c.id, %(model)s, r.params, %(prompt)s
      FROM c, unnest(%(ids)s::uuid[], %(params)s::jsonb[]) WITH ORDINALITY AS r(id, params, n)
     ORDER BY r.n
"""


async def insert_with_context(
    conn: AsyncConnection,
    *,
    tenant: str,
    content: str,
    model: str,
    jobs: list[tuple[uuid.UUID, dict[str, Any]]],
    prompt: str | None = None,
) -> uuid.UUID:
    """A new context holding `content` and one pending result per (id, params) of `jobs`, in one
    round trip; the context's id. `prompt`: what the model gets when it is not `content`."""
    context_id = uuid.uuid4()
    values = {
        "context_id": context_id,
        "tenant": tenant,
        "content": content,
        "model": model,
        "prompt": prompt,
        "ids": [result_id for result_id, _ in jobs],
        "params": [Jsonb(params) for _, params in jobs],
    }
    await conn.execute(_INSERT_WITH_CONTEXT, values)
    return context_id


# Conditional like every write that ends a job: only a pending job is cancelled.
# A job its worker had claimed ends `abort`, as vLLM names an aborted generation (a streamed one gets
# it from its worker, with the text it had produced); one still queued never generated anything.
_CANCEL = """
    UPDATE result SET status = 'cancelled', error = 'cancelled by the client', finished_at = now(), updated_at = now(),
           finish_reason = CASE WHEN started_at IS NOT NULL
                                 AND NOT coalesce((params->>'stream')::boolean, false) THEN 'abort' END
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


# What a result row weighs in a listing: its texts and its parameters (which may carry images).
_SIZE = sql.SQL(
    "COALESCE(octet_length(output), 0) + COALESCE(octet_length(prompt), 0)"
    " + COALESCE(octet_length(error), 0) + pg_column_size(params)"
)


async def page(
    conn: AsyncConnection, *, filters: dict[str, Any], cursor: str | None, limit: int, max_bytes: int
) -> tuple[list[dict[str, Any]], str | None]:
    return await newest_first(
        conn, "result", sql.SQL("result.*"), _SIZE, filters, cursor=cursor, limit=limit, max_bytes=max_bytes
    )


# Finished jobs with their prompt, oldest first from a keyset position (created_at, id): the export.
# A NULL parameter is no filter. The page's candidates are sized first (from lengths Postgres keeps),
# and only those within the byte bound are read whole.
# `{at}`: the time the window and the order apply to, created_at or finished_at (EXPORT_TIMES).
_EXPORT_PAGE = """
    WITH candidates AS (
        SELECT r.id, r.{at} AS at,
               COALESCE(octet_length(r.output), 0) + COALESCE(octet_length(r.prompt), 0)
               + COALESCE(octet_length(r.error), 0) + pg_column_size(r.params) + octet_length(c.content) AS bytes
          FROM result AS r JOIN context AS c ON c.id = r.context_id
         WHERE r.status = ANY(%(statuses)s::text[])
           AND (%(tenant)s::text IS NULL OR r.tenant = %(tenant)s)
           AND (%(model)s::text IS NULL OR r.model = %(model)s)
           AND (%(since)s::timestamptz IS NULL OR r.{at} >= %(since)s)
           AND (%(until)s::timestamptz IS NULL OR r.{at} < %(until)s)
           AND (%(after_at)s::timestamptz IS NULL OR (r.{at}, r.id) > (%(after_at)s, %(after_id)s::uuid))
         ORDER BY r.{at}, r.id
         LIMIT %(limit)s
    ), sized AS (
        SELECT id, at, count(*) OVER () AS page_candidates,
               COALESCE(sum(bytes) OVER (ORDER BY at, id
                                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS bytes_before
          FROM candidates
    )
    SELECT r.id, r.tenant, r.context_id, r.model, r.params, r.prompt, r.status, r.output, r.error,
           r.finish_reason, r.prompt_tokens, r.completion_tokens, r.attempts,
           r.created_at, r.started_at, r.finished_at, c.content, s.page_candidates
      FROM sized AS s JOIN result AS r ON r.id = s.id JOIN context AS c ON c.id = r.context_id
     WHERE s.bytes_before < %(max_bytes)s
     ORDER BY s.at, r.id
"""
EXPORT_TIMES = ("created_at", "finished_at")
_EXPORT_PAGES = {at: _EXPORT_PAGE.format(at=at) for at in EXPORT_TIMES}


async def export_page(
    conn: AsyncConnection,
    *,
    statuses: list[str],
    tenant: str | None,
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
    max_bytes: int,
    by: str = "created_at",
) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` finished jobs after `after`, oldest first by `by` (EXPORT_TIMES: the window
    applies to it too), with their context's content, no more once those before hold `max_bytes`
    (one at least); and whether more may follow."""
    params = {
        "statuses": statuses,
        "tenant": tenant,
        "model": model,
        "since": since,
        "until": until,
        "after_at": after[0] if after else None,
        "after_id": after[1] if after else None,
        "limit": limit,
        "max_bytes": max_bytes,
    }
    cur = conn.cursor(row_factory=dict_row)
    rows = await (await cur.execute(_EXPORT_PAGES[by], params)).fetchall()
    candidates = rows[0]["page_candidates"] if rows else 0
    return rows, candidates == limit or len(rows) < candidates


# ---------------------------------------------------------------- worker side

# A job is free when nobody holds a live lease on it; `owner`'s own lapsed or live lease too (a
# claim whose answer was lost with its connection), the caller skipping what it runs already.
# A job past JOB_DEADLINE_S is never started: the sweeper ends it, saying why.
_CLAIM = """
    UPDATE result AS r
       SET started_at = now(), attempts = r.attempts + 1, updated_at = now(),
           lease_owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s)
      FROM context AS c
     WHERE r.id = ANY(%(ids)s::uuid[]) AND c.id = r.context_id AND r.status = 'pending'
       AND (r.lease_until IS NULL OR r.lease_until < now() OR r.lease_owner = %(owner)s)
       AND r.created_at >= now() - make_interval(secs => %(deadline)s)
    RETURNING r.id, r.model, r.params, r.attempts, COALESCE(r.prompt, c.content),
              EXTRACT(EPOCH FROM r.deadline_at - now())::float8, r.attempts > 1 OR r.error IS NOT NULL
"""
# The heartbeat: one statement for every job a worker process holds.
# A row another statement holds locked (its outcome being written, a cancel) is skipped, not waited
# for: the heartbeat never joins a lock cycle with the batched writes, which lock in another order.
# It still counts as held (the snapshot says so); the next beat renews it.
_RENEW = """
    WITH renewed AS (
        UPDATE result SET lease_until = now() + make_interval(secs => %(lease)s)
         WHERE id IN (SELECT id FROM result
                       WHERE id = ANY(%(ids)s::uuid[]) AND lease_owner = %(owner)s AND status = 'pending'
                         FOR UPDATE SKIP LOCKED))
    SELECT id FROM result
     WHERE id = ANY(%(ids)s::uuid[]) AND lease_owner = %(owner)s AND status = 'pending'
"""
_COMPLETE = """
    UPDATE result AS r
       SET status = 'completed', output = v.output, error = NULL, finish_reason = v.finish_reason,
           prompt_tokens = v.prompt_tokens, completion_tokens = v.completion_tokens,
           finished_at = now(), updated_at = now()
      FROM jsonb_to_recordset(%(rows)s::jsonb)
           AS v(id uuid, output text, finish_reason text, prompt_tokens integer, completion_tokens integer)
     WHERE r.id = v.id AND r.status = 'pending'
    RETURNING r.*
"""
_FAIL = """
    UPDATE result AS r
       SET status = 'failed', error = v.error, finished_at = now(), updated_at = now()
      FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(id uuid, error text)
     WHERE r.id = v.id AND r.status = 'pending'
    RETURNING r.*
"""
# `spent` 0: the attempt does not count (Triton was unreachable: an outage, not the job's failure).
_RELEASE = """
    UPDATE result SET started_at = NULL, lease_owner = NULL, lease_until = NULL, error = %(error)s,
                      attempts = attempts - 1 + %(spent)s, updated_at = now()
     WHERE id = %(id)s AND status = 'pending'
"""
# Jobs whose worker stopped renewing its lease: released (so the next sweeps treat them as never
# started, not sending them again each time) and returned to be sent again.
_RELEASE_LAPSED = """
    UPDATE result SET started_at = NULL, lease_owner = NULL, lease_until = NULL, updated_at = now(),
                      error = 'its worker stopped renewing its lease (lease held by ' || lease_owner || '); running it again'
     WHERE id IN (
        SELECT id FROM result
         WHERE status = 'pending' AND started_at IS NOT NULL
           AND (lease_until IS NULL OR lease_until < now())
         ORDER BY created_at
         LIMIT %(limit)s
         FOR UPDATE SKIP LOCKED)
    RETURNING id
"""
# The sweeper's statements skip rows another statement holds locked (a worker writing them): no lock
# cycle with the batched writes, and a skipped row is looked at again by the next sweep.
# Touching `updated_at` keeps the next sweep from sending the same rows again right away.
_REQUEUE_CANDIDATES = """
    UPDATE result SET updated_at = now()
     WHERE id IN (
        SELECT id FROM result
         WHERE status = 'pending' AND started_at IS NULL
           AND updated_at < now() - make_interval(secs => %(requeue_after)s)
         ORDER BY created_at
         LIMIT %(limit)s
         FOR UPDATE SKIP LOCKED)
    RETURNING id
"""
# A job whose own timeout_s is within JOB_DEADLINE_S ends by it (`_CANCEL_PAST_DEADLINE`), not here.
# `started`: a worker was running it (the caller has its generation aborted).
_FAIL_EXPIRED = """
    UPDATE result
       SET status = 'failed', finished_at = now(), updated_at = now(), lease_owner = NULL, lease_until = NULL,
           error = CASE WHEN started_at IS NULL
                        THEN 'deadline exceeded: still pending ' || round(%(deadline)s) || ' s after submission'
                        ELSE 'deadline exceeded: not finished within JOB_DEADLINE_S = ' || round(%(deadline)s)
                             || ' s of its submission' END
                   || COALESCE(%(why)s, '') || COALESCE(' (last error: ' || error || ')', '')
     WHERE id IN (
        SELECT id FROM result
         WHERE status = 'pending' AND created_at < now() - make_interval(secs => %(deadline)s)
           AND NOT COALESCE((params->>'timeout_s')::float8 <= %(deadline)s, false)
         FOR UPDATE SKIP LOCKED)
    RETURNING id, started_at IS NOT NULL AS started
"""

# id -> the final row as written (all columns)
FinalRows = dict[uuid.UUID, dict[str, Any]]
# id -> (model, params, attempts, prompt, seconds left before its own deadline or None, whether it
# ran before: another attempt, or a run given back without spending one, which leaves its `error`)
ClaimedRows = dict[uuid.UUID, tuple[str, dict[str, Any], int, str, float | None, bool]]


def claim_many(
    conn: Connection, result_ids: list[uuid.UUID], owner: str, lease_s: float, deadline_s: float
) -> ClaimedRows:
    """Take the jobs that are pending, free (no live lease but `owner`'s) and submitted less than
    `deadline_s` (JOB_DEADLINE_S) ago, with a lease of `lease_s`."""
    values = {"ids": result_ids, "owner": owner, "lease": lease_s, "deadline": deadline_s}
    rows = conn.execute(_CLAIM, values).fetchall()
    return {
        rid: (model, params, attempts, content, left, ran_before)
        for rid, model, params, attempts, content, left, ran_before in rows
    }


def renew_leases(conn: Connection, result_ids: list[uuid.UUID], owner: str, lease_s: float) -> set[uuid.UUID]:
    """Extend `owner`'s leases; returned: the jobs it still holds (the others ended or were taken over)."""
    params = {"ids": result_ids, "owner": owner, "lease": lease_s}
    return {row[0] for row in conn.execute(_RENEW, params).fetchall()}


def complete_many(
    conn: Connection, outcomes: dict[uuid.UUID, tuple[str, str | None, int | None, int | None]]
) -> FinalRows:
    """Write each (output, finish_reason, prompt_tokens, completion_tokens) once. Returned: the rows
    that were still pending, as now written."""
    if not outcomes:
        return {}
    batch = _json_rows(
        {
            "id": str(rid),
            "output": storable(output),
            "finish_reason": reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }
        for rid, (output, reason, prompt_tokens, completion_tokens) in outcomes.items()
    )
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute(_COMPLETE, {"rows": batch}).fetchall()
    return {row["id"]: row for row in rows}


def fail_many(conn: Connection, errors: dict[uuid.UUID, str]) -> FinalRows:
    """Like `complete_many`, for jobs that end with an error."""
    if not errors:
        return {}
    batch = _json_rows({"id": str(rid), "error": storable(error)} for rid, error in errors.items())
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute(_FAIL, {"rows": batch}).fetchall()
    return {row["id"]: row for row in rows}


def release(conn: Connection, result_id: uuid.UUID, error: str, *, spend_attempt: bool = True) -> bool:
    """Give the claim and its lease back before the job runs again; `error` tells pollers why it
    is taking longer. Without `spend_attempt` the attempt the claim counted is given back too."""
    params = {"id": result_id, "error": error, "spent": 1 if spend_attempt else 0}
    return conn.execute(_RELEASE, params).rowcount > 0


def release_lapsed(conn: Connection, *, limit: int) -> list[uuid.UUID]:
    """Jobs whose lease lapsed (their worker died or lost Postgres), released to be sent again."""
    return [row[0] for row in conn.execute(_RELEASE_LAPSED, {"limit": limit}).fetchall()]


def requeue_candidates(conn: Connection, *, requeue_after_s: float, limit: int) -> list[uuid.UUID]:
    """Pending jobs whose message was probably lost: never started and untouched for a while."""
    params = {"requeue_after": requeue_after_s, "limit": limit}
    return [row[0] for row in conn.execute(_REQUEUE_CANDIDATES, params).fetchall()]


def fail_expired(
    conn: Connection, *, deadline_s: float, why: str | None = None
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Nothing stays pending forever: past the deadline a job fails, keeping its last error;
    `why` (e.g. Triton unreachable) is added to the message. Returned: the failed jobs, and those
    of them a worker was running."""
    params = {"deadline": deadline_s, "why": f" ({why})" if why else None}
    rows = conn.execute(_FAIL_EXPIRED, params).fetchall()
    return [rid for rid, _ in rows], [rid for rid, started in rows if started]


# ---------------------------------------------------------------- stopped jobs: cancel and deadlines

# A job stopped before its end keeps what it had produced; `abort` is vLLM's finish reason for it.
# The same whoever made the row final: the API's cancel, or the sweeper (JOB_DEADLINE_S, or its own deadline).
_RECORD_STOPPED = """
    UPDATE result SET output = %(output)s, prompt_tokens = %(prompt_tokens)s,
           completion_tokens = %(completion_tokens)s, finish_reason = 'abort', updated_at = now()
     WHERE id = %(id)s AND status IN ('cancelled', 'failed') AND finish_reason IS NULL
    RETURNING *
"""
_END_PAST_DEADLINE = """
    UPDATE result SET status = 'cancelled', error = %(error)s, output = %(output)s,
           prompt_tokens = %(prompt_tokens)s, completion_tokens = %(completion_tokens)s,
           finish_reason = 'abort', finished_at = now(), updated_at = now()
     WHERE id = %(id)s AND status = 'pending'
    RETURNING *
"""
_CANCEL_PAST_DEADLINE = """
    UPDATE result
       SET status = 'cancelled', finished_at = now(), updated_at = now(),
           error = 'deadline passed: not finished within timeout_s = ' || (params->>'timeout_s')
                   || ' s of its submission'
     WHERE id IN (SELECT id FROM result WHERE status = 'pending' AND deadline_at < now() FOR UPDATE SKIP LOCKED)
    RETURNING id
"""


def record_stopped(
    conn: Connection,
    result_id: uuid.UUID,
    output: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
) -> dict[str, Any] | None:
    """What a job stopped by a cancel notice had produced, on its (already final) row, whoever ended
    it (the API's cancel, the sweeper at JOB_DEADLINE_S or at its own deadline); once."""
    return _write_stopped(conn, _RECORD_STOPPED, result_id, None, output, prompt_tokens, completion_tokens)


async def record_streamed_text(
    conn: AsyncConnection, result_id: uuid.UUID, output: str
) -> dict[str, Any] | None:
    """What a cancelled streamed job's stream had delivered, when its worker could not say what it
    had produced (gone, or too slow): token counts unknown. Once, as `record_stopped`."""
    values = {"id": result_id, "output": storable(output), "prompt_tokens": None, "completion_tokens": None}
    cur = conn.cursor(row_factory=dict_row)
    return await (await cur.execute(_RECORD_STOPPED, values)).fetchone()


def end_past_deadline(
    conn: Connection,
    result_id: uuid.UUID,
    error: str,
    output: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
) -> dict[str, Any] | None:
    """A job that ran out of its own time: `cancelled`, with the reason and what it had produced."""
    return _write_stopped(
        conn, _END_PAST_DEADLINE, result_id, error, output, prompt_tokens, completion_tokens
    )


def _write_stopped(
    conn: Connection,
    statement: str,
    result_id: uuid.UUID,
    error: str | None,
    output: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
) -> dict[str, Any] | None:
    values = {
        "id": result_id,
        "error": storable(error),
        "output": storable(output),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
    return conn.cursor(row_factory=dict_row).execute(statement, values).fetchone()


def cancel_past_deadline(conn: Connection) -> list[uuid.UUID]:
    """Pending jobs past their own deadline (queued, or on a worker that did not end them) end `cancelled`."""
    return [row[0] for row in conn.execute(_CANCEL_PAST_DEADLINE).fetchall()]


# ---------------------------------------------------------------- retention (the operator's purge)

# A batch at a time, each its own transaction: rows are locked briefly, never a table's worth.
# The `Idempotency-Key` records of the sends that made the deleted results go too: a replay sends anew.
_PURGE = """
    WITH gone AS (
        DELETE FROM result WHERE id IN (
            SELECT id FROM result
             WHERE status IN ('completed', 'failed', 'cancelled') AND created_at < %(before)s
               AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
             LIMIT %(batch)s)
        RETURNING id, tenant
    ), replays AS (
        DELETE FROM idempotency_key AS i USING gone
         WHERE i.tenant = gone.tenant AND i.response->>'result_id' = gone.id::text
    )
    SELECT count(*) FROM gone
"""
_COUNT_PURGEABLE = """
    SELECT count(*) FROM result
     WHERE status IN ('completed', 'failed', 'cancelled') AND created_at < %(before)s
       AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
"""


async def purge_finished(conn: AsyncConnection, before: datetime, tenant: str | None, batch: int) -> int:
    """Delete up to `batch` ended results created before `before`; how many were deleted."""
    row = await (await conn.execute(_PURGE, {"before": before, "tenant": tenant, "batch": batch})).fetchone()
    return int(row[0]) if row else 0


async def count_purgeable(conn: AsyncConnection, before: datetime, tenant: str | None) -> int:
    row = await (await conn.execute(_COUNT_PURGEABLE, {"before": before, "tenant": tenant})).fetchone()
    return int(row[0]) if row else 0
