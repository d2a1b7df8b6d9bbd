"""FastAPI dependencies: the request's session, settings, Triton clients, the enqueuer."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings, get_settings
from app.db import pop_after_commit
from app.triton.admin import TritonAdmin


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
    # Callbacks must not block (the enqueue hands the id to a publisher thread).
    for callback in pop_after_commit(session):
        callback()


def settings_dep(request: Request) -> Settings:
    settings: Settings = getattr(request.app.state, "settings", None) or get_settings()
    return settings


def get_admin(request: Request) -> TritonAdmin:
    admin: TritonAdmin = request.app.state.triton_admin
    return admin
