"""Database engine and sessions (SQLAlchemy 2, psycopg 3)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Connection, Engine, MetaData, create_engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase

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


# Where the API's per-job statements get a psycopg connection. What ran inside the block is
# committed when it exits: the pool's connections are in autocommit (tests pass savepoints).
Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


# psycopg connections made outside SQLAlchemy (the API's statement pool, the worker's job store).
PSYCOPG_OPTIONS: dict[str, Any] = {"options": "-c timezone=UTC", "prepare_threshold": 0}


def psycopg_conninfo(settings: Settings) -> str:
    """DATABASE_URL as libpq takes it (without SQLAlchemy's `+psycopg` driver suffix)."""
    url = make_url(settings.DATABASE_URL).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def make_statement_pool(settings: Settings) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """psycopg's own pool, for the statements every job runs (submit, poll).

    Measured per statement (process CPU, this machine): SQLAlchemy's AsyncConnection checkout +
    execute of a prebuilt Core statement 430 us, psycopg's pool + prepared execute 170 us; a job
    runs three of them in the API. A fixed size, opened in the background at startup: 256 clients
    starting at once found a pool that grew one connection at a time (each a backend fork) and
    waited a second for it (bench: warm-up submits). `Connect` users open it on first use too
    (e.g. without a lifespan, in tests); opening needs the running loop."""
    return AsyncConnectionPool(
        psycopg_conninfo(settings),
        min_size=settings.DB_POOL_SIZE,
        max_size=settings.DB_POOL_SIZE,
        kwargs={"autocommit": True, **PSYCOPG_OPTIONS},
        open=False,
        name="statements",
    )


@lru_cache
def get_engine() -> Engine:
    """The process's engine. Worker processes call `reset_engine()` after fork."""
    return make_engine(get_settings())


def reset_engine() -> None:
    """Forget the engine inherited from a parent process (connections must not cross a fork)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()


@contextmanager
def transaction() -> Iterator[Connection]:
    """A transaction on the process's engine (no ORM session: cheaper for plain statements)."""
    with get_engine().begin() as connection:
        yield connection
