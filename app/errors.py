"""One error family for the API and the one place that renders errors as {"error": ..., "detail": ...}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from app.db import DATABASE_ERRORS

log = logging.getLogger(__name__)


class AppError(Exception):
    status_code = 400

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.detail = detail
        self.headers = headers


class NotFound(AppError):
    status_code = 404


class Conflict(AppError):
    status_code = 409


class PayloadTooLarge(AppError):
    status_code = 413


class InvalidInput(AppError):
    status_code = 422


class ServiceUnavailable(AppError):
    status_code = 503


DATABASE_DOWN = "the database is unavailable; nothing was changed, try again"


def error_response(
    status_code: int, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Every error answer of the API: {"error": ..., "detail": ...}."""
    return JSONResponse(
        status_code=status_code, content={"error": message, "detail": detail}, headers=headers
    )


def describe_validation(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        problems.append({"field": loc, "message": err.get("msg", ""), "type": err.get("type", "")})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return f"invalid request: {summary}", problems


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, problems = describe_validation(exc)
        return error_response(422, message, problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}) or None)

    @app.exception_handler(RecursionError)
    async def too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        # json.loads of a body nested thousands of levels deep
        return error_response(422, "invalid request: the JSON body is nested too deeply")

    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, DATABASE_DOWN)

    for error_type in DATABASE_ERRORS:
        app.add_exception_handler(error_type, database_down)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; the request was not processed")
