from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fastapi import APIRouter, Body, Depends, Header, Path, Response
from fastapi.responses import JSONResponse

from app import quotas
from app.db import AsyncConnection
from app.deps import Caller, caller
from app.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable, stream_error
from app.query import StrictQueryRoute
from app.routes.contexts import IDEMPOTENCY_KEY_DOC
from app.schemas import ErrorBody, ModelInfo, ResultOut, SendAccepted, SendOptions
from app.services import idempotency
from app.services import results as service
from app.triton.admin import ModelCatalog, ModelState, TritonUnavailable

log = logging.getLogger(__name__)

router = APIRouter(prefix="/models", tags=["models"], route_class=StrictQueryRoute)


def triton_unreachable(exc: TritonUnavailable, what: str) -> ServiceUnavailable:
    """The answer when Triton cannot be asked: the cause (with Triton's address) is logged, never
    shown to a caller."""
    log.warning("%s: %s", what, exc)
    return ServiceUnavailable(f"{what}: Triton is unreachable; try again later")


_LOCATION = {"Location": {"description": "The result: `/results/{result_id}`", "schema": {"type": "string"}}}
_PREFERENCE_APPLIED = {
    "Preference-Applied": {"description": "`wait=N`, the wait that was applied", "schema": {"type": "string"}}
}


def _names(models: dict[str, ModelState], *, ready_only: bool) -> str:
    names = [m.name for m in models.values() if m.ready or not ready_only]
    return ", ".join(sorted(names)) or "none"


async def check_ready(catalog: ModelCatalog, model_name: str) -> None:
    """Check the model against Triton's repository (cached briefly) before a job is accepted. While
    Triton is unreachable, a model the catalog saw ready within its window is accepted (its jobs
    wait for Triton)."""
    try:
        models = await catalog.get()
        if model_name not in models or not models[model_name].ready:
            models = await catalog.get(refresh=True)  # it may have been loaded a moment ago
    except TritonUnavailable as exc:
        if catalog.seen_ready_recently(model_name):
            return
        raise triton_unreachable(exc, f"cannot check model '{model_name}'") from exc
    model = models.get(model_name)
    if model is None:
        raise NotFound(
            f"model '{model_name}' is not served by Triton; available models: {_names(models, ready_only=False)}",
            detail={"available": sorted(models)},
        )
    if not model.ready:
        raise Conflict(
            f"model '{model_name}' is not ready (state {model.state or 'not loaded'}); "
            f"ready models: {_names(models, ready_only=True)}",
            detail={"state": model.state, "reason": model.reason},
        )


@router.get(
    "/",
    response_model=list[ModelInfo],
    responses={503: {"model": ErrorBody, "description": "Triton or the database unreachable"}},
)
async def list_models(c: Caller = Depends(caller)) -> list[ModelInfo]:
    """The models in Triton's repository, read live, with their state and readiness."""
    try:
        models = await c.rt.triton_admin.list_models()
    except TritonUnavailable as exc:
        raise triton_unreachable(exc, "cannot list the models") from exc
    return [
        ModelInfo(name=m.name, version=m.version, state=m.state, ready=m.ready, reason=m.reason)
        for m in models
    ]


@router.post(
    "/send/{model_name}/{context_id}",
    status_code=202,
    response_model=SendAccepted,
    responses={
        200: {
            "model": ResultOut,
            "description": "With `Prefer: wait=N`: the job ended within N seconds, its final result",
            "headers": {**_LOCATION, **_PREFERENCE_APPLIED},
        },
        202: {"description": "Accepted: poll the result at `Location`", "headers": _LOCATION},
        404: {"model": ErrorBody, "description": "Unknown context or model"},
        409: {"model": ErrorBody, "description": "Model not ready"},
        429: {"model": ErrorBody, "description": "Over the tenant's pending jobs or the key's submit rate"},
        503: {"model": ErrorBody, "description": "Triton or the database unreachable"},
    },
)
async def send(
    context_id: uuid.UUID,
    params: SendOptions | None = Body(
        default=None, description="Sampling parameters and options; all optional."
    ),
    model_name: str = Path(min_length=1, max_length=255, description="A model served by Triton."),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description=IDEMPOTENCY_KEY_DOC),
    prefer: str | None = Header(
        None,
        max_length=200,
        description="`wait=N` (N ≤ 60): if the job ends within N seconds the answer is 200 with the final "
        "result, else the usual 202.",
    ),
    c: Caller = Depends(caller),
) -> Any:
    """Send a stored context to a model. Answers at once with the result id; poll
    `GET /results/{result_id}` (the `Location` header) until it is `completed` or `failed`.
    With `Prefer: wait=N` the answer waits up to N seconds for the job to end."""
    wait_s = _preferred_wait(prefer)
    await check_ready(c.rt.model_catalog, model_name)
    params = params or SendOptions()
    service.check_params(params, c.rt.settings.MAX_TOKENS_LIMIT, c.rt.settings.JOB_DEADLINE_S)
    admission = quotas.Admission(c.rt.submit_rate, c.rt.pending, c.principal)
    if idempotency_key is None:
        async with admission:
            await admission.admit()
            accepted = await service.submit(
                c.rt.db,
                c.rt.inserts,
                c.rt.enqueue,
                c.principal,
                model=model_name,
                context_id=context_id,
                params=params,
                templates=c.rt.templates,
                waiter=c.rt.waiter,
            )
            admission.created()
        result_id, url = accepted.result_id, accepted.url
        answer: Response = Response(
            accepted.model_dump_json(), status_code=202, media_type="application/json"
        )
    else:

        async def create(conn: AsyncConnection) -> tuple[int, SendAccepted]:
            # A replay creates nothing: only a first request counts against the quotas.
            await admission.admit(conn=conn)
            job = await service.insert_job(
                conn,
                c.principal,
                model=model_name,
                context_id=context_id,
                params=params,
                templates=c.rt.templates,
            )
            return 202, job

        async with admission:
            status, first, created = await idempotency.first_answer(
                c.rt.db,
                c.principal,
                idempotency.check_key(idempotency_key),
                idempotency.fingerprint(
                    f"POST /models/send/{model_name}/{context_id}", params.model_dump_json()
                ),
                create,
            )
            if created:  # committed by now
                admission.created()
        result_id, url = uuid.UUID(first["result_id"]), first["url"]
        if created:
            c.rt.waiter.created(result_id, c.principal.tenant)
            c.rt.enqueue(result_id)
        answer = JSONResponse(first, status_code=status)
    answer.headers["Location"] = url
    if wait_s:
        try:
            final = await service.final_within(c.rt.db, c.rt.waiter, c.principal, result_id, wait_s)
        except Exception as exc:
            # The job exists: an outage during the wait leaves it the 202 (the preference is not
            # honoured), never an error that would make the client send it again.
            if stream_error(exc) is None:
                raise
            log.warning("result %s: Prefer: wait not honoured: %s", result_id, exc)
            final = None
        if final is not None:
            headers = {"Location": url, "Preference-Applied": f"wait={wait_s:g}"}
            return Response(final, status_code=200, media_type="application/json", headers=headers)
    return answer


_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def _preferred_wait(prefer: str | None) -> float:
    """Seconds of RFC 7240's `Prefer: wait=N` (0 without it): names are case-insensitive, other
    preferences are not ours to honour; a wait that is not a number of seconds up to 60 is refused."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        if name.strip().lower() != "wait":
            continue
        seconds = value.strip().strip('"')
        if not _SECONDS.fullmatch(seconds) or float(seconds) > 60:
            raise InvalidInput(
                f"Prefer: wait={seconds} is not a number of seconds from 0 to 60",
                detail={"field": "header.Prefer"},
            )
        return float(seconds)
    return 0.0
