"""FastAPI dependencies: the request's session, settings, Triton clients, the enqueuer."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.config import Settings, get_settings
from app.triton.admin import TritonAdmin


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: committed at the end, rolled back on error.

    Use with `scope="function"` so the commit happens before the response is sent."""
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


def settings_dep(request: Request) -> Settings:
    settings: Settings = getattr(request.app.state, "settings", None) or get_settings()
    return settings


def get_admin(request: Request) -> TritonAdmin:
    admin: TritonAdmin = request.app.state.triton_admin
    return admin
