"""The OpenAI-compatible surface (/v1): chat completions, completions and the model list, on
durable jobs. Each choice is a result row: the answer's `id` (and each choice's `result_id`, and the
`X-Result-Id` header listing them) is what `GET /results/{id}` shows. A client that leaves before its
answer cancels the call's unfinished jobs (the engine stops generating them, as vLLM's server does),
unless it sent an Idempotency-Key: then they go on, for a retry with the key to answer from. Errors
are in OpenAI's shape (app/errors.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app import background, quotas, sse
from app.deps import Caller, caller
from app.errors import AppError, Conflict, NotFound
from app.routes.models import check_ready, triton_unreachable
from app.schemas_openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelList,
    ModelObject,
    OpenAIError,
)
from app.services import openai as service
from app.services import openai_stream
from app.services import results as results_service
from app.triton.admin import TritonUnavailable

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])
# nginx's "client closed request": counted in the metrics, read by nobody.
CLIENT_LEFT = 499

IDEMPOTENCY_DOC = (
    "Any string: the same key with the same request within 24 hours answers from the same jobs "
    "(created once)."
)
_ERROR_DOCS = {
    400: "Invalid or unsupported field (named in `param`), model without a chat template, job refused by the engine",
    404: "Unknown model",
    409: "Model not ready, or the job was cancelled",
    429: "Over the tenant's pending jobs or the key's submit rate",
    502: "Triton failed the job",
    503: "Triton or the database unreachable",
    504: "The jobs did not finish within OPENAI_WAIT_S (they go on)",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The errors an operation answers itself (app.openapi adds the 401, and the shape)."""
    return {code: {"model": OpenAIError, "description": _ERROR_DOCS[code]} for code in codes}


_COMPLETION_ERRORS = _errors(400, 404, 409, 429, 502, 503, 504)


async def _check_model(c: Caller, model: str) -> None:
    try:
        await check_ready(c.rt.model_catalog, model)
    except NotFound as exc:
        raise AppError(exc.message, 404, detail={"field": "model"}, code="model_not_found") from exc
    except Conflict as exc:
        raise AppError(exc.message, 409, detail={"field": "model"}, code="model_not_ready") from exc


async def _create(c: Caller, call: service.Call, idempotency_key: str | None) -> list[uuid.UUID]:
    """Create the call's jobs, quotas first (the pending-jobs cap counts each of its jobs); a
    repeated Idempotency-Key is answered from the first call's jobs whatever the quotas."""

    async with quotas.Admission(c.rt.submit_rate, c.rt.pending, c.principal) as admission:
        result_ids, created = await service.create_jobs(
            c.rt.db, c.rt.enqueue, c.principal, call, idempotency_key, c.rt.waiter, admission.admit
        )
        if created:
            admission.created(len(result_ids))
    return result_ids


async def _client_left(request: Request) -> None:
    """Returns once the client has closed its connection (its body was read already: the next
    message the server gives is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_left_jobs(c: Caller, result_ids: list[uuid.UUID]) -> None:
    """The client left a call without an Idempotency-Key: nobody can come back for its jobs."""
    cancelled = 0
    for result_id in result_ids:
        try:
            await results_service.cancel(
                c.rt.db, c.rt.cancel_notices, c.principal, result_id, 0.0, c.rt.token_streams, c.rt.waiter
            )
            cancelled += 1
        except Conflict:  # ended already
            pass
        except Exception as exc:
            log.warning("result %s: not cancelled after its client left: %s", result_id, exc)
    log.info("a /v1 client left before its answer: %d of %d job(s) cancelled", cancelled, len(result_ids))


async def _run(c: Caller, call: service.Call, idempotency_key: str | None) -> list[dict[str, Any]] | None:
    """Create the call's jobs, then wait for their final rows; None if the client left first."""
    result_ids = await _create(c, call, idempotency_key)
    keyed = idempotency_key is not None
    waiting = asyncio.ensure_future(
        service.wait_final(
            c.rt.db, c.rt.waiter, c.principal, result_ids, c.rt.settings.OPENAI_WAIT_S, keyed=keyed
        )
    )
    try:
        if not keyed:
            left = asyncio.ensure_future(_client_left(c.request))
            try:
                await asyncio.wait({waiting, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                left.cancel()
            if not waiting.done():
                waiting.cancel()
                background.detached(_cancel_left_jobs(c, result_ids))
                return None
        return await waiting
    except Exception as exc:
        raise service.after_creation(exc, result_ids, keyed=keyed) from exc
    finally:
        waiting.cancel()


async def _stream(c: Caller, call: service.Call, idempotency_key: str | None) -> StreamingResponse:
    """Create the call's jobs, then answer with their chunks as they are generated."""
    result_ids = await _create(c, call, idempotency_key)
    keyed = idempotency_key is not None
    try:
        body = await openai_stream.chunks(
            c.rt.db, c.rt.waiter, c.rt.token_streams, c.principal, call, result_ids, keyed=keyed
        )
    except Exception as exc:
        raise service.after_creation(exc, result_ids, keyed=keyed) from exc
    if not keyed:
        body = _cancel_if_left(body, c, result_ids)
    return sse.response(body, headers={"X-Result-Id": ",".join(map(str, result_ids))})


async def _cancel_if_left(
    body: AsyncIterator[bytes], c: Caller, result_ids: list[uuid.UUID]
) -> AsyncIterator[bytes]:
    """The answer's chunks; if it is closed before its end (the client left), the jobs are cancelled."""
    ended = False
    try:
        async for chunk in body:
            yield chunk
        ended = True
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
        if not ended:
            background.detached(_cancel_left_jobs(c, result_ids))


def _answer(body: ChatCompletion | Completion) -> JSONResponse:
    ids = ",".join(choice.result_id for choice in body.choices)
    return JSONResponse(body.model_dump(mode="json"), headers={"X-Result-Id": ids})


@router.post("/chat/completions", response_model=ChatCompletion, responses=_COMPLETION_ERRORS)
async def chat_completions(
    body: ChatCompletionRequest,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description=IDEMPOTENCY_DOC),
    c: Caller = Depends(caller),
) -> Any:
    """OpenAI's chat completion: the conversation goes through the model's chat template, each of
    the `n` choices is a job, and the answer comes when they have all ended; with `stream`, as
    `chat.completion.chunk` events while they are generated, then `data: [DONE]`."""
    service.refuse_unsupported(body)
    await _check_model(c, body.model)
    call = await service.chat_call(body, c.rt.settings, c.rt.templates)
    if body.stream:
        return await _stream(c, call, idempotency_key)
    rows = await _run(c, call, idempotency_key)
    return Response(status_code=CLIENT_LEFT) if rows is None else _answer(service.chat_completion(call, rows))


@router.post("/completions", response_model=Completion, responses=_COMPLETION_ERRORS)
async def completions(
    body: CompletionRequest,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description=IDEMPOTENCY_DOC),
    c: Caller = Depends(caller),
) -> Any:
    """OpenAI's (legacy) completion: each prompt is sent as is; `n` choices per prompt, each a job."""
    service.refuse_unsupported(body)
    await _check_model(c, body.model)
    call = service.completion_call(body, c.rt.settings)
    if body.stream:
        return await _stream(c, call, idempotency_key)
    rows = await _run(c, call, idempotency_key)
    return Response(status_code=CLIENT_LEFT) if rows is None else _answer(service.completion(call, rows))


async def _models(c: Caller) -> list[ModelObject]:
    try:
        models = await c.rt.triton_admin.list_models()
    except TritonUnavailable as exc:
        raise triton_unreachable(exc, "cannot list the models") from exc
    return [ModelObject(id=m.name, ready=m.ready) for m in models]


@router.get("/models", response_model=ModelList, responses=_errors(503))
async def list_models(c: Caller = Depends(caller)) -> ModelList:
    """The models in Triton's repository, read live (`ready`: loaded and serving)."""
    return ModelList(data=await _models(c))


@router.get("/models/{model_id}", response_model=ModelObject, responses=_errors(404, 503))
async def get_model(model_id: str = Path(min_length=1), c: Caller = Depends(caller)) -> ModelObject:
    found = next((m for m in await _models(c) if m.id == model_id), None)
    if found is None:
        raise AppError(
            f"model '{model_id}' is not served by Triton",
            404,
            detail={"field": "model"},
            code="model_not_found",
        )
    return found
