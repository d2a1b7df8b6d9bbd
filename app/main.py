"""The FastAPI application: every request goes through its routes (one request path)."""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, params
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import Authentication, KeyRing
from app.bodylimit import BodyLimit
from app.config import Settings, get_settings
from app.db import Database
from app.deps import Runtime, caller
from app.errors import install_error_handlers
from app.fastpath import FastPath
from app.head import HeadAsGet
from app.metrics import ApiMetrics, RequestMetrics
from app.notify import CancelNotices, ResultWaiter, done_channel
from app.openapi import describe_errors
from app.queue import Doorbell, JobQueue, make_celery
from app.quotas import PendingJobs, SubmitRate
from app.routes import admin as admin_routes
from app.routes import contexts, export, health, models, openai, results
from app.routes import metrics as metrics_routes
from app.routes.health import schema_at_start
from app.services.results import Enqueue, ResultInserts
from app.stopping import on_stop_signal
from app.streams import TokenStreamReader
from app.templates import ChatTemplates
from app.triton.admin import ModelCatalog, TritonAdmin


class StartRefused(RuntimeError):
    """The API must not serve (e.g. the database's schema is older than the code): said in one line."""


class SayWhyStartWasRefused:
    """A refused start reaches uvicorn as one line, not as a traceback through the lifespan."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def one_line(message: Message) -> None:
            # Starlette sends the failure from inside its `except`: the exception is the one handled.
            refused = sys.exception()
            if message["type"] == "lifespan.startup.failed" and isinstance(refused, StartRefused):
                message = {**message, "message": str(refused)}
            await send(message)

        await self.app(scope, receive, one_line)


def create_app(
    settings: Settings | None = None,
    enqueue: Enqueue | None = None,
    dependencies: Sequence[params.Depends] = (),
    *,
    fast_path: bool = True,
) -> FastAPI:
    """The API. `enqueue` replaces the doorbell (tests record it instead); `dependencies` run
    before every operation (e.g. a deployment's own check); `fast_path=False` leaves submit and
    poll to FastAPI's own handling too (tests compare the two)."""
    settings = settings or get_settings()
    db = Database(settings)
    job_queue = JobQueue(make_celery(settings), settings.CELERY_QUEUE)
    doorbell = Doorbell(job_queue, settings.REDIS_URL)
    admin = TritonAdmin(settings.TRITON_URL, settings.TRITON_CONNECT_TIMEOUT_S)
    rt = Runtime(
        settings=settings,
        db=db,
        inserts=ResultInserts(db),
        job_queue=job_queue,
        enqueue=enqueue or doorbell,
        waiter=ResultWaiter(settings.REDIS_URL, done_channel(settings)),
        triton_admin=admin,
        model_catalog=ModelCatalog(admin, settings.MODEL_CACHE_TTL_S, settings.MODEL_READY_WINDOW_S),
        keyring=KeyRing(settings, db),
        submit_rate=SubmitRate(settings.REDIS_URL, settings.CELERY_QUEUE),
        pending=PendingJobs(db, settings.QUOTA_PENDING_REFRESH_S),
        templates=ChatTemplates(settings.CHAT_TEMPLATES_DIRS.split(",")),
        cancel_notices=CancelNotices(settings),
        token_streams=TokenStreamReader(settings),
        metrics=ApiMetrics(),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        refusal = await schema_at_start(settings)
        if refusal is not None:
            raise StartRefused(refusal)
        await db.open()  # connects in the background: Postgres may be down
        await rt.waiter.listening()  # at most a second: without Redis, polls read Postgres
        undo_signals = on_stop_signal(rt.waiter.stop)
        # What exists now lives as long as the process: out of the collector's generations, a full
        # collection no longer walks it (a walk stalls the event loop and every request on it).
        gc.freeze()
        try:
            yield
        finally:  # also when the server (or a test) leaves with an error: the pool's tasks must end
            undo_signals()
            await rt.waiter.close()
            await rt.submit_rate.close()
            await rt.cancel_notices.close()
            await rt.token_streams.close()
            await rt.model_catalog.close()
            await admin.close()
            await doorbell.close()
            await run_in_threadpool(job_queue.close)
            await db.close()

    app = FastAPI(
        title="LLM job queue",
        version="0.1.0",
        description="Store prompts, send them to LLMs served by Triton (vLLM backend) as durable jobs, "
        "and poll the results.",
        lifespan=lifespan,
        dependencies=list(dependencies),
        redirect_slashes=False,  # app.errors redirects, to a relative Location (not one built from Host)
        telemetry=None if settings.OPENTELEMETRY else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.runtime = rt
    # Middleware added last runs first: HEAD as GET, the answers' metrics, CORS (if configured), the body limit, then
    # authentication, then the calls every job makes from their routes' definitions (app.fastpath),
    # then FastAPI for everything.
    if fast_path:
        per_job: list[Callable[..., Any]] = [
            models.send,
            results.get_result,
            openai.chat_completions,
            openai.completions,
        ]
        app.add_middleware(FastPath, api=app, endpoints=per_job, dependency=caller)
    app.add_middleware(Authentication, keyring=rt.keyring)
    # JSON escaping can at most ~6x a string; anything beyond that cannot be a valid context.
    app.add_middleware(BodyLimit, max_bytes=settings.MAX_CONTENT_BYTES * 6 + 64 * 1024)
    if settings.cors_origins:  # before the key check: a browser's preflight carries no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After", "Preference-Applied", "WWW-Authenticate"],
            max_age=600,
        )
    app.add_middleware(RequestMetrics, metrics=rt.metrics)  # every answer, whoever gives it
    app.add_middleware(HeadAsGet)  # first of all: a HEAD goes through everything as its GET
    app.add_middleware(SayWhyStartWasRefused)  # the lifespan's messages only
    install_error_handlers(app)
    # export before results: `/results/{result_id}` would otherwise take `/results/export`.
    routers = (
        contexts.router,
        models.router,
        export.router,
        results.router,
        admin_routes.router,
        health.router,
        metrics_routes.router,
    )
    for router in (*routers, openai.router):
        app.include_router(router)
    document_api(app)
    return app


def document_api(app: FastAPI) -> None:
    """The API description as the app answers: FastAPI's, with the errors of app.errors' renderers
    and the statuses met outside the routes (app.openapi)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe_errors(
                get_openapi(
                    title=app.title, version=app.version, description=app.description, routes=app.routes
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
