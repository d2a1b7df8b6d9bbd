"""One error family for the API and the one place that renders errors as {"error": ..., "detail": ...}."""

from __future__ import annotations

import logging
import uuid
from typing import Any
from urllib.parse import quote, quote_from_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match

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
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.detail = detail
        self.headers = headers
        self.code = code  # machine-readable, shown by the OpenAI-shaped errors under /v1


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
REDIS_DOWN = "Redis is unavailable; try again"
STOPPING = "this API process is stopping; connect again (another process answers)"


def stream_error(exc: Exception) -> AppError | None:
    """The error a stream whose answer has begun ends with, for `exc` raised while it runs: an
    outage (Postgres, Redis) or one of the family. None: unexpected, it propagates."""
    if isinstance(exc, AppError):
        return exc
    if isinstance(exc, DATABASE_ERRORS):
        return ServiceUnavailable(DATABASE_DOWN)
    if isinstance(exc, RedisError | OSError):
        return ServiceUnavailable(REDIS_DOWN)
    return None


def error_response(
    status_code: int, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Every error answer of the API: {"error": ..., "detail": ...}."""
    return JSONResponse(
        status_code=status_code, content={"error": message, "detail": detail}, headers=headers
    )


# The OpenAI-compatible surface answers errors in OpenAI's shape, which its SDKs parse.
OPENAI_PREFIX = "/v1"
_OPENAI_TYPES = {
    401: "invalid_request_error",  # as OpenAI answers a bad key (code: invalid_api_key)
    403: "permission_error",
    429: "rate_limit_error",
}


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def openai_error_response(
    status_code: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error of the /v1 surface: {"error": {"message", "type", "param", "code"}}."""
    body = openai_error_body(status_code, message, param=param, code=code)
    return JSONResponse(status_code=status_code, content=body, headers=headers)


def openai_error_body(
    status_code: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object (also sent inside a stream, where no status code can say it)."""
    kind = _OPENAI_TYPES.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def render_error(
    path: str,
    status_code: int,
    message: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    """The error answer in the shape of the surface the request addressed."""
    if not is_openai_path(path):
        return error_response(status_code, message, detail, headers)
    if status_code == 422:  # OpenAI answers every invalid request 400
        status_code = 400
    param = detail.get("field") if isinstance(detail, dict) else None
    if isinstance(param, str) and param.startswith("body."):
        param = param[len("body.") :]
    if code is None and isinstance(detail, dict) and isinstance(detail.get("limit"), str):
        code = str(detail["limit"])
    if code is None and status_code == 401:
        code = "invalid_api_key"
    return openai_error_response(status_code, message, param=param, code=code, headers=headers)


# Names pydantic adds to an error's location for the branch of a union it tried: not fields.
_BRANCH_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none"})


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(
        str(p)
        for p in loc
        if not (isinstance(p, str) and (p in _BRANCH_TAGS or "[" in p or p.startswith("constrained-")))
    )


def describe_validation(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    problems = []
    for err in exc.errors():
        loc, message = tuple(err.get("loc", ())), str(err.get("msg", ""))
        if err.get("type") == "json_invalid" and len(loc) > 1:  # (body, character offset)
            reason = (err.get("ctx") or {}).get("error")
            message = f"{message} at character {loc[1]}" + (f": {reason}" if reason else "")
            loc = loc[:1]
        problems.append({"field": _field(loc), "message": message, "type": err.get("type", "")})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return f"invalid request: {summary}", problems


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    routes = request.app.router.routes
    allowed = {
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    }
    if "GET" in allowed:  # app.head answers HEAD as GET
        allowed.add("HEAD")
    return [method for method in _METHODS if method in allowed]


# What a Location's path and query may hold as sent: everything else is percent-encoded.
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


def _slash_twin(request: Request) -> str | None:
    """The request's path with its trailing slash added or removed, as sent (percent-encoded), if a
    route takes it with this method. Built from the raw path: the decoded one may hold `?`, `#`,
    CR LF or characters a header cannot carry."""
    path = request.scope["path"]
    if path == "/":
        return None
    twin = path[:-1] if path.endswith("/") else path + "/"
    routes = request.app.router.routes
    twin_scope = {**request.scope, "path": twin}
    if not any(route.matches(twin_scope)[0] == Match.FULL for route in routes):
        return None
    raw: bytes = request.scope.get("raw_path") or path.encode()
    raw = raw[:-1] if raw.endswith(b"/") else raw + b"/"
    return quote_from_bytes(raw, safe=_PATH_SAFE)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> JSONResponse:
        return render_error(request.url.path, exc.status_code, exc.message, exc.detail, exc.headers, exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, problems = describe_validation(exc)
        if is_openai_path(request.url.path):  # OpenAI answers a bad field 400, naming it
            param = problems[0]["field"].removeprefix("body.").removeprefix("body") if problems else None
            return openai_error_response(400, message, param=param or None)
        return error_response(422, message, problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers a body json.loads cannot read (not JSON's UTF-8, nested past the recursion
        # limit) with a bare 400 "error parsing the body": say what is wrong, as for other bad bodies.
        cause = exc.__cause__
        too_long = isinstance(cause, ValueError) and "digits" in str(cause)  # Python's int size bound
        if exc.status_code == 400 and (isinstance(cause, UnicodeDecodeError | RecursionError) or too_long):
            if isinstance(cause, UnicodeDecodeError):
                problem = "the body is not valid UTF-8"
            elif too_long:
                problem = "a number in the JSON body has more than 4300 digits"
            else:
                problem = "the JSON body is nested too deeply"
            detail = [{"field": "body", "message": problem, "type": "json_invalid"}]
            return render_error(request.url.path, 422, f"invalid request: {problem}", detail)
        if exc.status_code == 404 and (twin := _slash_twin(request)) is not None:
            # The path with (or without) its trailing slash: the Location is relative, so a Host
            # header sent by the client (or passed on by a proxy) never chooses where it points.
            location = quote(request.scope.get("root_path", ""), safe=_PATH_SAFE) + twin
            if request.scope.get("query_string"):
                location += "?" + quote_from_bytes(request.scope["query_string"], safe=_QUERY_SAFE)
            return render_error(
                request.url.path,
                307,
                f"this path is {twin}: follow the redirect (Location)",
                {"location": location},
                headers={"Location": location},
            )
        headers = dict(exc.headers or {}) or None
        if exc.status_code == 405:  # Starlette's Allow names the first route of the path only
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return render_error(request.url.path, exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        # json.loads of a body nested thousands of levels deep
        return render_error(request.url.path, 422, "invalid request: the JSON body is nested too deeply")

    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error on %s %s: %s", request.method, request.url.path, exc)
        return render_error(request.url.path, 503, DATABASE_DOWN)

    for error_type in DATABASE_ERRORS:
        app.add_exception_handler(error_type, database_down)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]  # what the client can quote to find the traceback in the log
        log.exception("unhandled error on %s %s (ref %s)", request.method, request.url.path, ref)
        return render_error(
            request.url.path,
            500,
            f"internal error; the request was not processed (ref {ref} in the API's log)",
        )
