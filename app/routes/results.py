from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from app.deps import get_session
from app.models import ResultStatus
from app.schemas import ErrorBody, Page, ResultOut
from app.services import results as service

router = APIRouter(prefix="/results", tags=["results"])


@router.get("/", response_model=Page[ResultOut])
def list_results(
    limit: int = Query(50, ge=1, le=500, description="Page size."),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page."),
    status: ResultStatus | None = Query(None, description="Only results in this state."),
    model: str | None = Query(None, max_length=255, description="Only results of this model."),
    context_id: uuid.UUID | None = Query(None, description="Only results of this context."),
    session: Session = Depends(get_session, scope="function"),
) -> Page[ResultOut]:
    """Results, newest first, filtered by status, model and context (admin listing)."""
    rows, next_cursor = service.list_results(
        session, limit=limit, cursor=cursor, status=status, model=model, context_id=context_id
    )
    return Page[ResultOut](items=[ResultOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{result_id}", response_model=ResultOut, responses={404: {"model": ErrorBody}})
def get_result(result_id: uuid.UUID, session: Session = Depends(get_session, scope="function")) -> ResultOut:
    """Poll a job: `pending` (queued, or running once `started_at` is set), then `completed` with the
    text, finish reason and token counts, or `failed` with the reason in `error`."""
    return ResultOut.model_validate(service.get_result(session, result_id))
