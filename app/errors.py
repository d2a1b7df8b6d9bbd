"""One error family for the API, rendered as {"error": ..., "detail": ...}."""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy.exc
from starlette.responses import JSONResponse


class AppError(Exception):
    status_code = 400

    def __init__(self, message: str, status_code: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.detail = detail


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
# What a lost or refused database connection raises, through SQLAlchemy or from psycopg's pool.
DATABASE_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)


def error_response(status_code: int, message: str, detail: Any = None) -> JSONResponse:
    """Every error answer of the API: {"error": ..., "detail": ...}."""
    return JSONResponse(status_code=status_code, content={"error": message, "detail": detail})
