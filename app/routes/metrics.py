from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from app.deps import Runtime
from app.metrics import CONTENT_TYPE
from app.query import StrictQueryRoute
from app.routes.admin import admin_runtime
from app.schemas import ErrorBody

router = APIRouter(tags=["metrics"], route_class=StrictQueryRoute)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"},
        403: {"model": ErrorBody, "description": "Not an admin key"},
    },
)
async def metrics(rt: Runtime = Depends(admin_runtime)) -> Response:
    """This API process's metrics (Prometheus text format; admin keys): its answers by method, path
    group and status, and the queue's state read now (jobs queued and running, the oldest queued)."""
    async with rt.db.connection() as conn:
        body = await rt.metrics.exposition(conn)
    return Response(body, media_type=CONTENT_TYPE)
