from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Query

from app.deps import Runtime, runtime
from app.schemas import ContextCreate, ContextOut, ErrorBody, Page
from app.services import contexts as service

router = APIRouter(prefix="/contexts", tags=["contexts"])


@router.post(
    "/",
    status_code=201,
    response_model=ContextOut,
    responses={413: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)
async def create_context(body: ContextCreate, rt: Runtime = Depends(runtime)) -> ContextOut:
    """Store a prompt. Its id is what `POST /models/send/{model}/{context_id}` takes."""
    return await service.create_context(rt.db, body.content, rt.settings.MAX_CONTENT_BYTES)


@router.get("/", response_model=Page[ContextOut])
async def list_contexts(
    limit: int = Query(50, ge=1, le=500, description="Page size."),
    cursor: str | None = Query(None, max_length=512, description="`next_cursor` of the previous page."),
    rt: Runtime = Depends(runtime),
) -> Page[ContextOut]:
    """Stored contexts, newest first, one page at a time."""
    return await service.list_contexts(rt.db, limit=limit, cursor=cursor)


@router.get("/{context_id}", response_model=ContextOut, responses={404: {"model": ErrorBody}})
async def get_context(context_id: uuid.UUID, rt: Runtime = Depends(runtime)) -> ContextOut:
    """One stored context."""
    return await service.get_context(rt.db, context_id)
