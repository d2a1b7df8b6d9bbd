from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse

from app.db import AsyncConnection
from app.deps import Caller, caller
from app.query import StrictQueryRoute
from app.schemas import PAGE_LIMIT, ContextCreate, ContextOut, ErrorBody, Page, TenantName
from app.services import contexts as service
from app.services import idempotency

router = APIRouter(prefix="/contexts", tags=["contexts"], route_class=StrictQueryRoute)

IDEMPOTENCY_KEY_DOC = (
    "Send the same key again with the same request (within 24 hours) to get the first answer again: "
    "nothing new is created. The same key with another request is refused (422)."
)


@router.post(
    "/",
    status_code=201,
    response_model=ContextOut,
    responses={413: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}},
)
async def create_context(
    body: ContextCreate,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description=IDEMPOTENCY_KEY_DOC),
    c: Caller = Depends(caller),
) -> Any:
    """Store a prompt. Its id is what `POST /models/send/{model}/{context_id}` takes. Counted against
    the key's submit rate apart from its jobs (429 past it)."""
    service.check_size(body.content, c.rt.settings.MAX_CONTENT_BYTES)
    if idempotency_key is None:
        await c.rt.submit_rate.check(c.principal, what="contexts")
        return await service.create_context(c.rt.db, c.principal, body.content)

    async def create(conn: AsyncConnection) -> tuple[int, ContextOut]:
        await c.rt.submit_rate.check(c.principal, what="contexts")  # a replay creates nothing: not counted
        return 201, await service.insert(conn, c.principal, body.content)

    status, answer, _ = await idempotency.first_answer(
        c.rt.db,
        c.principal,
        idempotency.check_key(idempotency_key),
        idempotency.fingerprint("POST /contexts/", body.model_dump_json()),
        create,
    )
    return JSONResponse(answer, status_code=status)


@router.get("/", response_model=Page[ContextOut])
async def list_contexts(
    limit: int = Query(50, ge=1, le=500, description=PAGE_LIMIT),
    cursor: str | None = Query(None, max_length=512, description="`next_cursor` of the previous page."),
    tenant: TenantName | None = Query(None, description="Admin keys: only this tenant's contexts."),
    c: Caller = Depends(caller),
) -> Page[ContextOut]:
    """Your tenant's contexts (an admin key: every tenant's), newest first, one page at a time."""
    return await service.list_contexts(
        c.rt.db,
        c.principal,
        tenant=tenant,
        limit=limit,
        cursor=cursor,
        max_bytes=c.rt.settings.PAGE_MAX_BYTES,
    )


@router.get("/{context_id}", response_model=ContextOut, responses={404: {"model": ErrorBody}})
async def get_context(context_id: uuid.UUID, c: Caller = Depends(caller)) -> ContextOut:
    """One stored context."""
    return await service.get_context(c.rt.db, c.principal, context_id)
