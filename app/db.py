"""The one way to the database: psycopg 3 connections from one pool per process.

SQL lives in the repositories (`app/repositories/`, one module per table); the SQLAlchemy models in
`app/models.py` only describe the schema for Alembic. Pool connections are in autocommit: a
statement that returns has committed. Several statements that must hold together run inside
`async with connection.transaction()` (or its sync twin).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from sqlalchemy import MetaData, make_url
from sqlalchemy.orm import DeclarativeBase

from app.config import Settings

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


AsyncConnection = psycopg.AsyncConnection[Any]
Connection = psycopg.Connection[Any]

# What a lost or refused database connection raises (the API answers 503).
DATABASE_ERRORS: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


def conninfo(settings: Settings) -> str:
    """DATABASE_URL as libpq takes it (without SQLAlchemy's `+psycopg` driver suffix)."""
    url = make_url(settings.DATABASE_URL).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


# How long a pool keeps trying to replace one lost connection (with growing pauses, 1 s, 2 s, ...)
# before giving that slot up; a later request asks for a new one at once. Short, so that a pool
# whose Postgres was down for a while reconnects as soon as a request needs it, not after a pause
# grown to minutes.
RECONNECT_TIMEOUT_S = 3.0


def connection_kwargs(settings: Settings, application_name: str) -> dict[str, Any]:
    return {
        "autocommit": True,
        # Timestamps are written by Postgres; keep the session in UTC.
        "options": "-c timezone=UTC",
        # Prepared on first use: the same few statements run for every job.
        "prepare_threshold": 0,
        "connect_timeout": max(1, round(settings.DB_CONNECT_TIMEOUT_S)),
        "application_name": application_name,
    }


class Database:
    """The API's pool. Fixed size, opened in the background at startup (Postgres may be down).

    A request never hangs: while Postgres fails (a query or a connection attempt failed, and nothing
    succeeded since) it waits at most DB_CONNECT_TIMEOUT_S for a connection, then fails (503); while
    Postgres answers, a busy pool is only a queue, waited for up to DB_POOL_WAIT_S."""

    def __init__(self, settings: Settings) -> None:
        self._slice_s = settings.DB_CONNECT_TIMEOUT_S
        self._queue_s = max(settings.DB_POOL_WAIT_S, settings.DB_CONNECT_TIMEOUT_S)
        self._failing = False
        self._errors_seen = 0
        self.pool: AsyncConnectionPool[AsyncConnection] = AsyncConnectionPool(
            conninfo(settings),
            min_size=settings.DB_POOL_SIZE,
            max_size=settings.DB_POOL_SIZE,
            kwargs=connection_kwargs(settings, f"llmq-api-{os.getpid()}"),
            timeout=settings.DB_CONNECT_TIMEOUT_S,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            open=False,
            name="api",
        )

    async def open(self) -> None:
        if self.pool.closed:
            await self.pool.open(wait=False)

    def _postgres_failing(self) -> bool:
        errors = self.pool.get_stats().get("connections_errors", 0)
        if errors > self._errors_seen:  # the pool could not connect since we last looked
            self._errors_seen = errors
            self._failing = True
        return self._failing

    async def _getconn(self) -> AsyncConnection:
        give_up = time.monotonic() + self._queue_s
        while True:
            try:
                return await self.pool.getconn(timeout=self._slice_s)
            except PoolTimeout:
                if self._postgres_failing() or time.monotonic() >= give_up:
                    raise

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        # Opening needs the running loop; apps used without a lifespan open it here.
        await self.open()
        connection = await self._getconn()
        try:
            yield connection
        except psycopg.OperationalError:
            # A terminated backend may look healthy until its next use: drop this one and
            # test the idle ones (after a Postgres restart all of them are dead).
            self._failing = True
            await connection.close()
            await self.pool.putconn(connection)
            await self.pool.check()
            raise
        except BaseException:
            await self.pool.putconn(connection)
            raise
        self._failing = False
        await self.pool.putconn(connection)

    async def close(self) -> None:
        await self.pool.close()


class SyncDatabase:
    """The worker's pool (its threads: the job store's writer, retries, the sweeper)."""

    def __init__(self, settings: Settings, *, size: int = 4) -> None:
        self.pool: ConnectionPool[Connection] = ConnectionPool(
            conninfo(settings),
            min_size=1,
            max_size=size,
            kwargs=connection_kwargs(settings, f"llmq-worker-{os.getpid()}"),
            timeout=settings.DB_CONNECT_TIMEOUT_S,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            open=False,
            name="worker",
        )

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        if self.pool.closed:
            self.pool.open(wait=False)
        with self.pool.connection() as connection:
            try:
                yield connection
            except psycopg.OperationalError:
                connection.close()  # see Database.connection
                self.pool.check()
                raise

    def close(self) -> None:
        self.pool.close()
