"""Results: submitting a job and reading it back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from datetime import datetime

import psycopg
from redis.exceptions import RedisError

from app.auth import Principal
from app.batching import Batcher
from app.db import DATABASE_ERRORS, AsyncConnection, Database
from app.errors import Conflict, InvalidInput, NotFound
from app.models import ResultStatus
from app.notify import PENDING, CancelNotices, ResultWaiter
from app.repositories import contexts as contexts_repo
from app.repositories import results as repo
from app.schemas import Page, ResultOut, SamplingParams, SendAccepted, SendOptions
from app.streams import TokenStreamReader
from app.templates import ChatTemplates

log = logging.getLogger(__name__)

Enqueue = Callable[[uuid.UUID], None]

# A long poll on a job this process created trusts the notices for this long before it reads Postgres.
TRUST_PENDING_S = 5.0


def check_params(
    params: SamplingParams, max_tokens_limit: int, deadline_limit_s: float | None = None
) -> None:
    if params.max_tokens > max_tokens_limit:
        raise InvalidInput(
            f"max_tokens must be at most {max_tokens_limit}, got {params.max_tokens}",
            detail={"field": "max_tokens", "limit": max_tokens_limit},
        )
    timeout_s = getattr(params, "timeout_s", None)
    if deadline_limit_s is not None and timeout_s is not None and timeout_s > deadline_limit_s:
        raise InvalidInput(
            f"timeout_s must be at most {deadline_limit_s:g} (the platform's deadline for any job), got {timeout_s!r}",
            detail={"field": "timeout_s", "limit": deadline_limit_s},
        )


def _new_result(
    principal: Principal, model: str, context_id: uuid.UUID, params: SendOptions, prompt: str | None
) -> repo.NewResult:
    return repo.NewResult(
        id=uuid.uuid4(),
        tenant=principal.tenant,
        context_id=context_id,
        model=model,
        # As asked; the flags only when set.
        params=params.model_dump(
            exclude_none=True,
            exclude={k for k in ("chat", "ignore_eos", "stream") if not getattr(params, k)},
        ),
        prompt=prompt,
        timeout_s=params.timeout_s,
    )


def _accepted(row: repo.NewResult, created_at: datetime | None) -> SendAccepted:
    if created_at is None:  # another tenant's context is as unknown as a missing one
        raise NotFound(f"context {row.context_id} not found")
    return SendAccepted(
        result_id=row.id,
        status=ResultStatus.PENDING,
        model=row.model,
        context_id=row.context_id,
        created_at=created_at,
        url=f"/results/{row.id}",
    )


async def _chat_prompt(
    conn: AsyncConnection,
    principal: Principal,
    model: str,
    context_id: uuid.UUID,
    templates: ChatTemplates | None,
) -> str:
    """The model's chat template around the context, as the prompt (a `chat` submit's)."""
    assert templates is not None
    context = await contexts_repo.get(conn, context_id, principal.tenant)
    if context is None:
        raise NotFound(f"context {context_id} not found")
    return templates.render(model, [{"role": "user", "content": context["content"]}])


async def insert_job(
    conn: AsyncConnection,
    principal: Principal,
    *,
    model: str,
    context_id: uuid.UUID,
    params: SendOptions,
    templates: ChatTemplates | None = None,
) -> SendAccepted:
    """Record a pending result for one of the tenant's contexts on `conn` (inside the caller's
    transaction). The caller rings the doorbell once this has committed. With `chat` the prompt is
    the model's chat template around the context."""
    prompt = await _chat_prompt(conn, principal, model, context_id, templates) if params.chat else None
    row = _new_result(principal, model, context_id, params, prompt)
    return _accepted(row, (await repo.insert_for_contexts(conn, [row])).get(row.id))


class ResultInserts:
    """The new results of concurrent submits, one statement (and one commit) per batch: a burst
    of submits costs Postgres and this process a few round trips instead of one each."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._batcher: Batcher[repo.NewResult, datetime | None] = Batcher(
            self._insert, shared_failure=lambda exc: isinstance(exc, DATABASE_ERRORS)
        )

    async def __call__(self, row: repo.NewResult) -> datetime | None:
        """The row's created_at once committed; None if its tenant has no such context."""
        return await self._batcher(row)

    async def _insert(self, rows: list[repo.NewResult]) -> list[datetime | Exception | None]:
        try:
            async with self._db.connection() as conn:
                created = await repo.insert_for_contexts(conn, rows)
            return [created.get(row.id) for row in rows]
        except DATABASE_ERRORS:
            raise  # Postgres unreachable: every submit waiting is refused alike (503)
        except psycopg.Error:
            if len(rows) == 1:
                raise
            # Something in one row refused the whole statement: each on its own, so only it fails.
            return [await self._one(row) for row in rows]

    async def _one(self, row: repo.NewResult) -> datetime | Exception | None:
        try:
            async with self._db.connection() as conn:
                return (await repo.insert_for_contexts(conn, [row])).get(row.id)
        except psycopg.Error as exc:
            return exc


async def submit(
    db: Database,
    inserts: ResultInserts,
    enqueue: Enqueue,
    principal: Principal,
    *,
    model: str,
    context_id: uuid.UUID,
    params: SendOptions,
    templates: ChatTemplates | None = None,
    waiter: ResultWaiter | None = None,
) -> SendAccepted:
    """Record a pending result, then ring the doorbell: only once the row is committed."""
    prompt = None
    if params.chat:
        async with db.connection() as conn:
            prompt = await _chat_prompt(conn, principal, model, context_id, templates)
    row = _new_result(principal, model, context_id, params, prompt)
    accepted = _accepted(row, await inserts(row))
    if waiter is not None:
        waiter.created(accepted.result_id, principal.tenant)
    enqueue(accepted.result_id)  # the row above has committed: the worker can see it
    return accepted


async def read(db: Database, principal: Principal, result_id: uuid.UUID) -> ResultOut:
    async with db.connection() as conn:
        row = await repo.get(conn, result_id, principal.tenant_filter)
    if row is None:  # another tenant's result is as unknown as a missing one
        raise NotFound(f"result {result_id} not found")
    return ResultOut.model_validate(row)


async def poll(
    db: Database, waiter: ResultWaiter, principal: Principal, result_id: uuid.UUID, wait_s: float
) -> bytes:
    """The result as JSON now, or with `wait_s` > 0 as soon as it is final (at most `wait_s` later)."""
    if wait_s <= 0:
        known = waiter.known(result_id, principal.tenant_filter)
        if known:  # a notice brought its final row
            return known
        return (await read(db, principal, result_id)).model_dump_json().encode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        body = await _wait_once(db, waiter, principal, result_id, wait_s)
        wait_s = deadline - loop.time()
        if not _pending(body) or wait_s <= 0.05 or waiter.stopping:
            return body
        # Woken without its end while time is left: the subscription was lost (Redis down). Waiting
        # on, reading the row each second, keeps the wait the client asked for.
        await asyncio.sleep(min(1.0, wait_s))
        wait_s = deadline - loop.time()


async def _wait_once(
    db: Database, waiter: ResultWaiter, principal: Principal, result_id: uuid.UUID, wait_s: float
) -> bytes:
    """The result as JSON once a notice says it ended, or after `wait_s`, or when the notices are
    lost (then possibly still pending)."""
    # Watch before reading, so that a notice sent between the read and the wait is not missed.
    async with waiter.watch(result_id) as finished:
        known = waiter.known(result_id, principal.tenant_filter)  # no await since the watch began
        if known:
            return known
        if known == PENDING:  # created here and not ended: no read, but a lost notice costs little
            trusted_s = min(wait_s, TRUST_PENDING_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(finished), trusted_s)
            wait_s -= trusted_s
        if not finished.done():
            result = await read(db, principal, result_id)  # the tenant check
            if result.status != ResultStatus.PENDING:
                return result.model_dump_json().encode()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished, wait_s)
    row_json = finished.result() if finished.done() and not finished.cancelled() else None
    # The notice carries the final row as ResultOut renders it (its id first): answer with it as is.
    if row_json is not None and row_json.startswith(b'{"id":"%s"' % str(result_id).encode()):
        return row_json
    if row_json is not None:
        log.warning("result %s: unreadable completion notice, reading the database", result_id)
    return (await read(db, principal, result_id)).model_dump_json().encode()


async def final_within(
    db: Database, waiter: ResultWaiter, principal: Principal, result_id: uuid.UUID, wait_s: float
) -> bytes | None:
    """The result's final row as JSON if it ends within `wait_s`, else None."""
    body = await poll(db, waiter, principal, result_id, wait_s)
    return (
        None
        if body.startswith(b'{"id":"%s","tenant":' % str(result_id).encode()) and _pending(body)
        else body
    )


async def _with_streamed_text(
    db: Database, token_streams: TokenStreamReader, principal: Principal, result_id: uuid.UUID
) -> bytes | None:
    """A cancelled streamed job's row with the text its stream holds (that of its last run)."""
    entries = await token_streams.read(result_id, 0, block_ms=None)
    text = "".join(piece.text for piece in entries.pieces)
    async with db.connection() as conn:
        row = await repo.record_streamed_text(conn, result_id, text)
        if row is None:  # its worker said first
            row = await repo.get(conn, result_id, principal.tenant_filter)
    return None if row is None else ResultOut.model_validate(row).model_dump_json().encode()


def _pending(body: bytes) -> bool:
    return b'"status":"pending"' in body


async def _with_partial_output(
    db: Database, waiter: ResultWaiter, principal: Principal, result_id: uuid.UUID, wait_s: float
) -> bytes | None:
    """A streamed job's row once its worker has recorded what the job had produced (its finish
    reason then says `abort`; the worker announces that row); None if that takes longer than `wait_s`."""
    async with waiter.watch(result_id) as recorded:
        result = await read(db, principal, result_id)  # recorded already?
        if result.finish_reason is None and wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(recorded), wait_s)
            result = await read(db, principal, result_id)
    return result.model_dump_json().encode() if result.finish_reason is not None else None


async def cancel(
    db: Database,
    notices: CancelNotices,
    principal: Principal,
    result_id: uuid.UUID,
    partial_wait_s: float = 0.0,
    token_streams: TokenStreamReader | None = None,
    waiter: ResultWaiter | None = None,
) -> bytes:
    """Cancel a pending job: queued, it never runs; running, its worker aborts the generation.
    Cancelling a cancelled job answers the same row; a finished one is a conflict."""
    async with db.connection() as conn:
        row = await repo.cancel(conn, result_id, principal.tenant_filter)
        if row is None:
            row = await repo.get(conn, result_id, principal.tenant_filter)
    if row is None:
        raise NotFound(f"result {result_id} not found")
    result = ResultOut.model_validate(row)
    body = result.model_dump_json().encode()
    if result.status == ResultStatus.CANCELLED:
        # Again for a repeated cancel: harmless, and a lost one is resent.
        if result.started_at is None or not result.params.get("stream") or result.finish_reason is not None:
            await notices.cancelled(result_id, body)
            return body
        # A running streamed job: its worker records the text produced so far and announces that
        # row; waiters hear of the end from there, or from here once the wait is over.
        await notices.cancelled(result_id, None)
        try:
            # A lapsed lease: its worker is gone, nobody will say what it had produced.
            lapsed = row["lease_until"] is not None and row["lease_until"] < row["finished_at"]
            partial = None
            if waiter is not None:
                wait_s = 0 if lapsed else partial_wait_s
                partial = await _with_partial_output(db, waiter, principal, result_id, wait_s)
            if partial is None and token_streams is not None:  # what its stream delivered, then
                with contextlib.suppress(RedisError, OSError):  # Redis down: the row as it is
                    partial = await _with_streamed_text(db, token_streams, principal, result_id)
            body = partial or body
        finally:
            await notices.ended(result_id, body)
        return body
    raise Conflict(
        f"result {result_id} is already {result.status.value}: only a pending job can be cancelled",
        detail={"status": result.status.value},
    )


async def list_results(
    db: Database,
    principal: Principal,
    *,
    tenant: str | None,
    limit: int,
    cursor: str | None,
    max_bytes: int,
    status: list[ResultStatus] | None = None,
    model: str | None = None,
    context_id: uuid.UUID | None = None,
) -> Page[ResultOut]:
    filters = {
        "tenant": principal.listing_tenant(tenant),
        "status": [s.value for s in status] if status else None,
        "model": model,
        "context_id": context_id,
    }
    async with db.connection() as conn:
        rows, next_cursor = await repo.page(
            conn, filters=filters, cursor=cursor, limit=limit, max_bytes=max_bytes
        )
    return Page[ResultOut](items=[ResultOut.model_validate(r) for r in rows], next_cursor=next_cursor)
