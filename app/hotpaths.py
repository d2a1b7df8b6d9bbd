"""The two requests every job makes, answered without FastAPI's per-request machinery.

A job costs one `POST /models/send/{model}/{context}` and normally one `GET /results/{id}?wait=N`.
Under load, FastAPI's routing, dependency solving, request objects and the ORM session were about
half of the API's CPU per job (py-spy, bench/README.md), and the API's event loop is where submits
queue. This ASGI layer answers those two requests when they are well-formed, through the same
service calls (`services.results.submit` / `poll`) and the same schemas as the routes. Anything it
does not fully recognise (a malformed id, an invalid body or query, an unknown or unready model) is
handed to FastAPI untouched, before any side effect: error answers and the OpenAPI description
have one source, the routes.
"""

from __future__ import annotations

import json
import logging
import re
import uuid

from pydantic import ValidationError
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import DATABASE_DOWN, DATABASE_ERRORS, AppError, error_response
from app.schemas import SamplingParams
from app.services import results as service
from app.triton.admin import ModelCatalog, TritonUnavailable

log = logging.getLogger(__name__)

_SEND_PREFIX = "/models/send/"
_RESULT_PREFIX = "/results/"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_WAIT_QUERY = re.compile(rb"wait=(\d{1,2}(?:\.\d{1,6})?)")
_JSON_TYPES = (b"application/json",)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the already-read body again (for the hand-over to FastAPI)."""
    replayed = False

    async def receive_again() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client went away."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def _json(send: Send, status: int, body: bytes, location: str | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if location is not None:
        headers.append((b"location", location.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HotPaths:
    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            path: str = scope["path"]
            if scope["method"] == "POST" and path.startswith(_SEND_PREFIX):
                await self._send_job(scope, receive, send, path[len(_SEND_PREFIX) :])
                return
            if scope["method"] == "GET" and path.startswith(_RESULT_PREFIX):
                result_id = path[len(_RESULT_PREFIX) :]
                wait_s = self._wait(scope["query_string"])
                if _UUID.fullmatch(result_id) and wait_s is not None:
                    await self._poll(scope, receive, send, uuid.UUID(result_id), wait_s)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    def _wait(query: bytes) -> float | None:
        if not query:
            return 0.0
        match = _WAIT_QUERY.fullmatch(query)
        if match is None:
            return None
        wait_s = float(match.group(1))
        return wait_s if wait_s <= 60 else None

    @staticmethod
    def _params(scope: Scope, body: bytes) -> SamplingParams | None:
        """The body as FastAPI would read it, or None to let FastAPI answer."""
        content_type = _header(scope, b"content-type")
        if content_type is not None and content_type.split(b";")[0].strip().lower() not in _JSON_TYPES:
            return None
        if not body:
            return SamplingParams()
        try:
            data = json.loads(body)
            return SamplingParams.model_validate(data) if isinstance(data, dict) else None
        except (ValueError, ValidationError):
            return None

    async def _model_ready(self, model: str) -> bool:
        catalog: ModelCatalog = self.state.model_catalog
        try:
            state = (await catalog.get()).get(model)
        except TritonUnavailable:
            return False
        return state is not None and state.ready

    async def _send_job(self, scope: Scope, receive: Receive, send: Send, rest: str) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        model, _, context_id = rest.partition("/")
        params = self._params(scope, body) if _UUID.fullmatch(context_id) else None
        if params is None or not 0 < len(model) <= 255 or not await self._model_ready(model):
            await self.app(scope, _replay(body, receive), send)
            return
        settings: Settings = self.state.settings
        try:
            accepted = await service.submit(
                self.state.connect,
                self.state.enqueue,
                model=model,
                context_id=uuid.UUID(context_id),
                params=params,
                max_tokens_limit=settings.MAX_TOKENS_LIMIT,
            )
        except Exception as exc:
            await self._error(scope, receive, send, exc)
            return
        await _json(send, 202, accepted.model_dump_json().encode(), location=accepted.url)

    async def _poll(
        self, scope: Scope, receive: Receive, send: Send, result_id: uuid.UUID, wait_s: float
    ) -> None:
        try:
            result = await service.poll(self.state.connect, self.state.result_waiter, result_id, wait_s)
        except Exception as exc:
            await self._error(scope, receive, send, exc)
            return
        await _json(send, 200, result.model_dump_json().encode())

    @staticmethod
    async def _error(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        """The answers the app's exception handlers give for the same errors."""
        if isinstance(exc, AppError):
            response = error_response(exc.status_code, exc.message, exc.detail)
        elif isinstance(exc, DATABASE_ERRORS):
            log.warning("database error on %s %s: %s", scope["method"], scope["path"], exc)
            response = error_response(503, DATABASE_DOWN)
        else:
            raise exc  # the app's last-resort handler answers 500
        await response(scope, receive, send)
