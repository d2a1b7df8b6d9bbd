"""The FastAPI application."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.ext.asyncio import async_sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings, get_settings
from app.db import Connect, make_async_engine, make_statement_pool
from app.errors import DATABASE_DOWN, DATABASE_ERRORS, AppError
from app.errors import error_response as _error
from app.hotpaths import HotPaths
from app.notify import ResultWaiter, done_channel
from app.queue import JobQueue
from app.routes import contexts, health, models, results
from app.services.results import Enqueue
from app.triton.admin import ModelCatalog, TritonAdmin

log = logging.getLogger(__name__)


def _describe_validation(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        problems.append({"field": loc, "message": err.get("msg", ""), "type": err.get("type", "")})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return f"invalid request: {summary}", problems


def _opening(pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]) -> Connect:
    """`pool.connection`, opening the pool on first use (opening needs the running loop)."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if pool.closed:
            await pool.open()
        async with pool.connection() as connection:
            yield connection

    return connect


class BodySizeLimit:
    """Refuse bodies far larger than any valid request before reading them (413, not a memory spike)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                    response = _error(
                        413, f"request body is {int(value)} bytes; the limit is {self.max_bytes} bytes"
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(
    settings: Settings | None = None, enqueue: Enqueue | None = None, *, hot_paths: bool = True
) -> FastAPI:
    """The API. `hot_paths=False` leaves every request to the FastAPI routes (tests compare the two)."""
    settings = settings or get_settings()

    engine = make_async_engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if statement_pool.closed:
            await statement_pool.open(wait=False)  # connects in the background: Postgres may be down
        # What exists now (modules, the app, its pools) lives as long as the process: out of the
        # collector's generations, a full collection no longer walks it. Measured here: 83 ms for
        # a full collection before, 0.1 ms after, and one of 141 ms stalled the event loop (and every
        # request on it) during a benchmark run.
        gc.freeze()
        try:
            yield
        finally:  # also when the server (or a test) leaves with an error: the pool's tasks must end
            await app.state.result_waiter.close()
            await app.state.model_catalog.close()
            await app.state.triton_admin.close()
            await run_in_threadpool(job_queue.close)
            await statement_pool.close()
            await engine.dispose()

    app = FastAPI(
        title="LLM job queue",
        version="0.1.0",
        description="Store prompts, send them to LLMs served by Triton (vLLM backend) as durable jobs, "
        "and poll the results.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = async_sessionmaker(bind=engine, expire_on_commit=False)
    statement_pool = make_statement_pool(settings)
    app.state.connect = _opening(statement_pool)
    admin = TritonAdmin(settings.TRITON_URL, settings.TRITON_CONNECT_TIMEOUT_S)
    app.state.triton_admin = admin
    app.state.model_catalog = ModelCatalog(admin, settings.MODEL_CACHE_TTL_S)
    job_queue = JobQueue(settings)
    app.state.job_queue = job_queue
    app.state.enqueue = enqueue or job_queue.enqueue_later
    app.state.result_waiter = ResultWaiter(settings.REDIS_URL, done_channel(settings))

    # Added first, so it runs inside the body limit (middleware added later wraps earlier ones).
    if hot_paths:
        app.add_middleware(HotPaths, state=app.state)
    # JSON escaping can at most ~6x a string; anything beyond that cannot be a valid context.
    app.add_middleware(BodySizeLimit, max_bytes=settings.MAX_CONTENT_BYTES * 6 + 64 * 1024)

    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return _error(exc.status_code, exc.message, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, problems = _describe_validation(exc)
        return _error(422, message, problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database error on %s %s: %s", request.method, request.url.path, exc)
        return _error(503, DATABASE_DOWN)

    for error_type in DATABASE_ERRORS:
        app.add_exception_handler(error_type, database_down)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; the request was not processed")

    for router in (contexts.router, models.router, results.router, health.router):
        app.include_router(router)
    return app
