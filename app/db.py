"""Database engine and sessions (SQLAlchemy 2, psycopg 3)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session

from app.config import Settings, get_settings

# A fixed naming convention makes Alembic autogenerate stable, predictable constraint names.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _engine_args(settings: Settings) -> dict[str, Any]:
    return {
        "pool_size": settings.DB_POOL_SIZE,
        "max_overflow": settings.DB_MAX_OVERFLOW,
        # No pre-ping: it costs a round trip per checkout on the hot paths. A connection broken
        # by a Postgres restart fails one statement (the API answers 503) and is replaced.
        "pool_recycle": 1800,
        # Timestamps are written by Postgres; keep the session in UTC.
        "connect_args": {"options": "-c timezone=UTC"},
    }


def make_engine(settings: Settings) -> Engine:
    """Synchronous engine: the worker, migrations and tools."""
    return create_engine(settings.DATABASE_URL, **_engine_args(settings))


def make_async_engine(settings: Settings) -> AsyncEngine:
    """The API's engine: psycopg's async driver, no thread hop per request.

    Autocommit: every API operation is one statement (the submit is a single INSERT … SELECT),
    so BEGIN/COMMIT would only add two round trips per request. A statement that returns has
    committed, which is what lets the enqueue follow it."""
    return create_async_engine(settings.DATABASE_URL, isolation_level="AUTOCOMMIT", **_engine_args(settings))


@lru_cache
def get_engine() -> Engine:
    """The process's engine. Worker processes call `reset_engine()` after fork."""
    return make_engine(get_settings())


def reset_engine() -> None:
    """Forget the engine inherited from a parent process (connections must not cross a fork)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()


# Callbacks to run once the session's transaction has committed (e.g. enqueue a job): a job
# must never be enqueued for a row the worker cannot see yet. Whoever commits runs them.
_AFTER_COMMIT_KEY = "after_commit"


def run_after_commit(session: Session | AsyncSession, callback: Callable[[], object]) -> None:
    session.info.setdefault(_AFTER_COMMIT_KEY, []).append(callback)


def pop_after_commit(session: Session | AsyncSession) -> list[Callable[[], object]]:
    callbacks: list[Callable[[], object]] = session.info.pop(_AFTER_COMMIT_KEY, [])
    return callbacks


@contextmanager
def transaction() -> Iterator[Connection]:
    """A transaction on the process's engine (no ORM session: cheaper for plain statements)."""
    with get_engine().begin() as connection:
        yield connection
