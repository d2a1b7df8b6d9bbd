"""`GET /results/export`: the tenant's finished jobs as JSON lines (a router of its own, included
before the results router so that `/results/{result_id}` does not take the path)."""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from app.deps import Caller, caller
from app.errors import InvalidInput, stream_error
from app.query import StrictQueryRoute
from app.schemas import ErrorBody, TenantName
from app.services import export as service

log = logging.getLogger(__name__)

router = APIRouter(prefix="/results", tags=["results"], route_class=StrictQueryRoute)


class FinalStatus(enum.StrEnum):
    """The states an exported job can be in (a refusal lists these, not `pending`)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-ndjson": {}}, "description": "One JSON object per line"},
        422: {"model": ErrorBody},
    },
)
async def export(
    since: datetime | None = Query(
        None, alias="from", description="Jobs created (or ended) at or after (ISO 8601)."
    ),
    until: datetime | None = Query(
        None, alias="to", description="Jobs created (or ended) before (ISO 8601)."
    ),
    by: Literal["created_at", "finished_at"] = Query(
        "created_at",
        description="The time `from`, `to` and the order apply to: the job's creation, or its end "
        "(`finished_at`: windows exported one after another hold each job once, as soon as it ended).",
    ),
    model: str | None = Query(None, max_length=255, pattern=r"^[^\x00]*$", description="Only this model's."),
    status: list[FinalStatus] | None = Query(
        None, description="Only these final states (repeatable); default: completed, failed, cancelled."
    ),
    tenant: TenantName | None = Query(None, description="Admin keys: only this tenant's jobs."),
    c: Caller = Depends(caller),
) -> StreamingResponse:
    """Your tenant's finished jobs (an admin key: every tenant's), oldest first, as JSON lines: id,
    timestamp, model, status, prompt (or messages), response, parameters, tokens. If the database
    fails after the first page, the last line is `{"error": ..., "detail": {"status": 503}}`.
    `by=finished_at` orders and windows them by their end instead of their creation."""
    for zone, value in (("from", since), ("to", until)):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(
                f"'{zone}' needs a time zone (e.g. 2026-11-28T00:00:00Z)", detail={"field": f"query.{zone}"}
            )
    if since is not None and until is not None and since >= until:
        raise InvalidInput(
            f"'from' ({since.isoformat()}) must be before 'to' ({until.isoformat()})",
            detail={"field": "query.from"},
        )
    body = service.lines(
        c.rt.db,
        c.principal,
        tenant=tenant,
        statuses=[s.value for s in status] if status else None,
        model=model,
        since=since,
        until=until,
        page_size=c.rt.settings.EXPORT_PAGE_SIZE,
        max_bytes=c.rt.settings.PAGE_MAX_BYTES,
        by=by,
    )
    # The first page is read before answering: a database error is still a proper 503.
    first = await anext(body, b"")

    async def pages() -> AsyncIterator[bytes]:
        yield first
        try:
            async for page in body:
                yield page
        except Exception as exc:  # the answer has begun: its last line says why it stops here
            error = stream_error(exc)
            if error is None:
                raise
            log.warning("export ended early: %s", exc)
            yield (
                json.dumps({"error": error.message, "detail": {"status": error.status_code}}).encode() + b"\n"
            )

    return StreamingResponse(pages(), media_type="application/x-ndjson")
