"""Results: submitting a job and reading it back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from app.auth import Principal
from app.db import AsyncConnection, Database
from app.errors import Conflict, InvalidInput, NotFound
from app.models import ResultStatus
from app.notify import PENDING, CancelNotices, ResultWaiter
from app.repositories import contexts as contexts_repo
from app.repositories import results as repo
from app.schemas import Page, ResultOut, SamplingParams, SendAccepted, SendOptions
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
            f"timeout_s must be at most {deadline_limit_s:g} (the platform's deadline for any job), got {timeout_s:g}",
            detail={"field": "timeout_s", "limit": deadline_limit_s},
        )


async def insert_job(
    conn: AsyncConnection,
    principal: Principal,
    *,
    model: str,
    context_id: uuid.UUID,
    params: SendOptions,
    templates: ChatTemplates | None = None,
) -> SendAccepted:
    """Record a pending result for one of the tenant's contexts. The caller rings the doorbell once
    this has committed. With `chat` the prompt is the model's chat template around the context."""
    result_id = uuid.uuid4()
    prompt = None
    if params.chat:
        assert templates is not None
        context = await contexts_repo.get(conn, context_id, principal.tenant)
        if context is None:
            raise NotFound(f"context {context_id} not found")
        prompt = templates.render(model, [{"role": "user", "content": context["content"]}])
    created_at = await repo.insert_for_context(
        conn,
        result_id=result_id,
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
    if created_at is None:  # another tenant's context is as unknown as a missing one
        raise NotFound(f"context {context_id} not found")
    return SendAccepted(
        result_id=result_id,
        status=ResultStatus.PENDING,
        model=model,
        context_id=context_id,
        created_at=created_at,
        url=f"/results/{result_id}",
    )


async def submit(
    db: Database,
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
    async with db.connection() as conn:
        accepted = await insert_job(
            conn, principal, model=model, context_id=context_id, params=params, templates=templates
        )
    if waiter is not None:
        waiter.created(accepted.result_id, principal.tenant)
    enqueue(accepted.result_id)  # the statement above has committed: the worker can see the row
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


def _pending(body: bytes) -> bool:
    return b'"status":"pending"' in body


async def _with_partial_output(
    db: Database, principal: Principal, result_id: uuid.UUID, wait_s: float
) -> bytes | None:
    """A streamed job's row once its worker has recorded what the job had produced (its finish
    reason then says `abort`); None if that takes longer than `wait_s`."""
    give_up = asyncio.get_running_loop().time() + wait_s
    while asyncio.get_running_loop().time() < give_up:
        await asyncio.sleep(0.02)
        result = await read(db, principal, result_id)
        if result.finish_reason is not None:
            return result.model_dump_json().encode()
    return None


async def cancel(
    db: Database,
    notices: CancelNotices,
    principal: Principal,
    result_id: uuid.UUID,
    partial_wait_s: float = 0.0,
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
        await notices.cancelled(result_id, body)
        if result.started_at is not None and result.params.get("stream") and result.finish_reason is None:
            return await _with_partial_output(db, principal, result_id, partial_wait_s) or body
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
    status: ResultStatus | None = None,
    model: str | None = None,
    context_id: uuid.UUID | None = None,
) -> Page[ResultOut]:
    filters = {
        "tenant": principal.tenant_filter or tenant,
        "status": status.value if status else None,
        "model": model,
        "context_id": context_id,
    }
    async with db.connection() as conn:
        rows, next_cursor = await repo.page(conn, filters=filters, cursor=cursor, limit=limit)
    return Page[ResultOut](items=[ResultOut.model_validate(r) for r in rows], next_cursor=next_cursor)
