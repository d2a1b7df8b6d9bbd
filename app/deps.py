"""FastAPI dependencies: the request's session, settings, Triton clients, the enqueuer."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings, get_settings
from app.db import pop_after_commit
from app.services.results import Enqueue
from app.triton.admin import ModelCatalog, TritonAdmin


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: committed at the end, rolled back on error.

    Use with `scope="function"` so the commit (and the enqueues that wait for it) happens
    before the response is sent: a client that gets 202 can poll the row at once."""
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            pop_after_commit(session)
            raise
    # Publishing is blocking I/O (Celery/kombu): keep it off the event loop.
    for callback in pop_after_commit(session):
        await run_in_threadpool(callback)


def settings_dep(request: Request) -> Settings:
    settings: Settings = getattr(request.app.state, "settings", None) or get_settings()
    return settings


def get_admin(request: Request) -> TritonAdmin:
    admin: TritonAdmin = request.app.state.triton_admin
    return admin


def get_catalog(request: Request) -> ModelCatalog:
    catalog: ModelCatalog = request.app.state.model_catalog
    return catalog


def get_enqueue(request: Request) -> Enqueue:
    enqueue: Enqueue = request.app.state.enqueue
    return enqueue
