from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse

from app import sse
from app.deps import Caller, caller
from app.errors import stream_error
from app.models import ResultStatus
from app.query import StrictQueryRoute
from app.schemas import PAGE_LIMIT, ErrorBody, Page, ResultOut, TenantName
from app.services import results as service
from app.services import streams
from app.streams import Restart

log = logging.getLogger(__name__)

RESTART_DATA = json.dumps(
    {"reason": "the job runs again from the start (its earlier run stopped): drop the text received before"}
)

router = APIRouter(prefix="/results", tags=["results"], route_class=StrictQueryRoute)


@router.get("/", response_model=Page[ResultOut])
async def list_results(
    limit: int = Query(50, ge=1, le=500, description=PAGE_LIMIT),
    cursor: str | None = Query(None, max_length=512, description="`next_cursor` of the previous page."),
    status: list[ResultStatus] | None = Query(
        None, max_length=4, description="Only results in this state (repeat it for several)."
    ),
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
        max_bytes=c.rt.settings.PAGE_MAX_BYTES,
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
        allow_inf_nan=False,
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
    generation in the engine, and a job sent with `"stream": true` keeps the text it had produced
    (`finish_reason` `abort`). A finished job is a 409 naming its status; a cancelled one answers again."""
    wait_s = c.rt.settings.CANCEL_PARTIAL_WAIT_S
    body = await service.cancel(
        c.rt.db, c.rt.cancel_notices, c.principal, result_id, wait_s, c.rt.token_streams, c.rt.waiter
    )
    return Response(body, media_type="application/json")


async def _visible(result_id: uuid.UUID, c: Caller = Depends(caller)) -> uuid.UUID:
    """Checked before the stream starts, so an unknown id is a plain 404 rather than a broken stream."""
    if c.rt.waiter.known(result_id, c.principal.tenant_filter) is None:  # else it is the tenant's
        await service.read(c.rt.db, c.principal, result_id)
    return result_id


@router.get(
    "/{result_id}/stream",
    response_class=StreamingResponse,
    responses={
        200: sse.openapi_response("`text/event-stream`: `token` events, then one `done` event."),
        404: {"model": ErrorBody},
    },
)
async def stream_result(
    result_id: uuid.UUID = Depends(_visible),
    last_event_id: int | None = Header(
        None,
        alias="Last-Event-ID",
        ge=0,
        le=2**63 - 1,
        description="Resume after this event (sent by EventSource).",
    ),
    c: Caller = Depends(caller),
) -> StreamingResponse:
    """The job's text as it is generated (jobs sent with `"stream": true`; another job's text comes whole
    when it ends): `event: token` with `data: {"text": ...}` and a sequence number as `id`, then
    `event: done` with the final row (its `error` says why a failed or cancelled job ended). Read from
    any API process, from the start or, with `Last-Event-ID`, after an event; after the end, all at once.
    `event: restart`: the job runs again from the start (its worker stopped); the text received before
    it is void (a client starting later never gets that text)."""
    follow = streams.follow(
        c.rt.db, c.rt.waiter, c.rt.token_streams, c.principal, result_id, last_event_id or 0
    )

    async def body() -> AsyncIterator[bytes]:
        last = last_event_id or 0
        async with contextlib.aclosing(follow) as items:  # a client that leaves ends the follow too
            try:
                async for item in items:
                    if isinstance(item, streams.Final):
                        yield sse.event(item.result.model_dump_json(), name="done", event_id=item.seq)
                    elif isinstance(item, streams.Quiet):
                        yield sse.KEEPALIVE
                    elif isinstance(item, Restart):
                        yield sse.event(RESTART_DATA, name="restart", event_id=item.seq)
                        last = item.seq
                    else:
                        yield sse.event(json.dumps({"text": item.text}), name="token", event_id=item.seq)
                        last = item.seq
            except Exception as exc:  # the answer has begun: its last event says why it stops here
                error = stream_error(exc)
                if error is None:
                    raise
                log.warning("stream of result %s ended after event %d: %s", result_id, last, exc)
                detail = {"status": error.status_code, "last_event_id": last}
                yield sse.event(json.dumps({"error": error.message, "detail": detail}), name="error")

    return sse.response(body())
