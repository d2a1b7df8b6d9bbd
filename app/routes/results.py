from __future__ import annotations

import asyncio
import contextlib
import uuid

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.deps import get_session
from app.models import ResultStatus
from app.notify import ResultWaiter
from app.schemas import ErrorBody, Page, ResultOut
from app.services import results as service

router = APIRouter(prefix="/results", tags=["results"])


@router.get("/", response_model=Page[ResultOut])
async def list_results(
    limit: int = Query(50, ge=1, le=500, description="Page size."),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page."),
    status: ResultStatus | None = Query(None, description="Only results in this state."),
    model: str | None = Query(None, max_length=255, description="Only results of this model."),
    context_id: uuid.UUID | None = Query(None, description="Only results of this context."),
    session: AsyncSession = Depends(get_session, scope="function"),
) -> Page[ResultOut]:
    """Results, newest first, filtered by status, model and context (admin listing)."""
    rows, next_cursor = await service.list_results(
        session, limit=limit, cursor=cursor, status=status, model=model, context_id=context_id
    )
    return Page[ResultOut](items=[ResultOut.model_validate(r) for r in rows], next_cursor=next_cursor)


async def _read(session: AsyncSession, result_id: uuid.UUID) -> ResultOut:
    try:
        return ResultOut.model_validate(await service.get_result(session, result_id))
    finally:
        await session.commit()  # ends the transaction: no connection is held while waiting


@router.get("/{result_id}", response_model=ResultOut, responses={404: {"model": ErrorBody}})
async def get_result(
    request: Request,
    result_id: uuid.UUID,
    wait: float = Query(
        0,
        ge=0,
        le=60,
        description="Long poll: seconds to wait for a pending job to finish before answering. "
        "0 (the default) answers at once.",
    ),
    session: AsyncSession = Depends(get_session, scope="function"),
) -> ResultOut:
    """Poll a job: `pending` (queued, or running once `started_at` is set), then `completed` with the
    text, finish reason and token counts, or `failed` with the reason in `error`. With `wait=N` the
    answer comes as soon as the job finishes, or after N seconds with the job still pending."""
    if wait <= 0:
        return await _read(session, result_id)
    waiter: ResultWaiter = request.app.state.result_waiter
    # Watch before reading, so that a notice sent between the read and the wait is not missed.
    async with waiter.watch(result_id) as finished:
        result = await _read(session, result_id)
        if result.status != ResultStatus.PENDING:
            return result
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished, wait)
    return await _read(session, result_id)
