from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Query, Response

from app.deps import Caller, caller
from app.models import ResultStatus
from app.schemas import ErrorBody, Page, ResultOut, TenantName
from app.services import results as service

router = APIRouter(prefix="/results", tags=["results"])


@router.get("/", response_model=Page[ResultOut])
async def list_results(
    limit: int = Query(50, ge=1, le=500, description="Page size."),
    cursor: str | None = Query(None, max_length=512, description="`next_cursor` of the previous page."),
    status: ResultStatus | None = Query(None, description="Only results in this state."),
    # Postgres text cannot hold NUL: refuse it here (422) instead of failing the query.
    model: str | None = Query(
        None, max_length=255, pattern=r"^[^\x00]*$", description="Only results of this model."
    ),
    context_id: uuid.UUID | None = Query(None, description="Only results of this context."),
    tenant: TenantName | None = Query(None, description="Admin keys: only this tenant's results."),
    c: Caller = Depends(caller),
) -> Page[ResultOut]:
    """Your tenant's results (an admin key: every tenant's), newest first, filtered by status, model,
    context and (admin) tenant."""
    return await service.list_results(
        c.rt.db,
        c.principal,
        tenant=tenant,
        limit=limit,
        cursor=cursor,
        status=status,
        model=model,
        context_id=context_id,
    )


@router.get("/{result_id}", response_model=ResultOut, responses={404: {"model": ErrorBody}})
async def get_result(
    result_id: uuid.UUID,
    wait: float = Query(
        0,
        ge=0,
        le=60,
        description="Long poll: seconds to wait for a pending job to finish before answering. "
        "0 (the default) answers at once.",
    ),
    c: Caller = Depends(caller),
) -> Response:
    """Poll a job: `pending` (queued, or running once `started_at` is set), then `completed` with the
    text, finish reason and token counts, or `failed` with the reason in `error`. With `wait=N` the
    answer comes as soon as the job finishes, or after N seconds with the job still pending."""
    # Already JSON (a completion notice carries the final row rendered): sent as is.
    body = await service.poll(c.rt.db, c.rt.waiter, c.principal, result_id, wait)
    return Response(body, media_type="application/json")


@router.post(
    "/{result_id}/cancel",
    response_model=ResultOut,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody, "description": "Already finished"}},
)
async def cancel_result(result_id: uuid.UUID, c: Caller = Depends(caller)) -> Response:
    """Cancel a job: `cancelled` at once. Queued, it never runs; running, the worker aborts its
    generation in the engine. A finished job is a 409 naming its status; a cancelled one answers again."""
    body = await service.cancel(c.rt.db, c.rt.cancel_notices, c.principal, result_id)
    return Response(body, media_type="application/json")
