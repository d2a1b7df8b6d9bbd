from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Query
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.deps import get_session, settings_dep
from app.schemas import ContextCreate, ContextOut, ErrorBody, Page
from app.services import contexts as service

router = APIRouter(prefix="/contexts", tags=["contexts"])


@router.post(
    "/",
    status_code=201,
    response_model=ContextOut,
    responses={413: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)
async def create_context(
    body: ContextCreate,
    session: AsyncSession = Depends(get_session, scope="function"),
    settings: Settings = Depends(settings_dep),
) -> ContextOut:
    """Store a prompt. Its id is what `POST /models/send/{model}/{context_id}` takes."""
    context = await service.create_context(session, body.content, settings.MAX_CONTENT_BYTES)
    return ContextOut.model_validate(context)


@router.get("/", response_model=Page[ContextOut])
async def list_contexts(
    limit: int = Query(50, ge=1, le=500, description="Page size."),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page."),
    session: AsyncSession = Depends(get_session, scope="function"),
) -> Page[ContextOut]:
    """Stored contexts, newest first, one page at a time."""
    rows, next_cursor = await service.list_contexts(session, limit, cursor)
    return Page[ContextOut](items=[ContextOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{context_id}", response_model=ContextOut, responses={404: {"model": ErrorBody}})
async def get_context(
    context_id: uuid.UUID, session: AsyncSession = Depends(get_session, scope="function")
) -> ContextOut:
    """One stored context."""
    return ContextOut.model_validate(await service.get_context(session, context_id))
