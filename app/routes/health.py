from __future__ import annotations

import asyncio
import logging
import os

import psycopg
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from app.config import Settings
from app.db import AsyncConnection, Database, connection_kwargs, conninfo
from app.deps import Runtime, runtime
from app.query import StrictQueryRoute
from app.schemas import ComponentHealth, Readiness
from app.triton.admin import TritonAdmin, TritonUnavailable

router = APIRouter(prefix="/health", tags=["health"], route_class=StrictQueryRoute)
log = logging.getLogger(__name__)

# Readiness is public: its answer names no address and no exception (they go to the log, once per change).
_last_logged: dict[str, str | None] = {}


def _report(component: str, public: str | None, internal: str | None = None) -> ComponentHealth:
    """The public answer for a component, logging the internal cause when it differs from the last one."""
    cause = None if public is None else internal or public
    previous = _last_logged.get(component)
    if previous != cause:
        _last_logged[component] = cause
        if cause is not None:
            log.warning("readiness: %s: %s", component, cause)
        else:
            log.info("readiness: %s is back", component)
    return ComponentHealth(ok=public is None, detail=public)


# Each component answers within this, so that readiness is answered within a second, whatever is down.
CHECK_TIMEOUT_S = 0.8
# At start, a database slow to answer is not held against it: the process starts.
START_CHECK_TIMEOUT_S = 2.0


# The migration this code's statements are written for (tests/unit/test_schema_revision.py keeps it
# equal to the migrations' head). Revisions are numbered in order: "0001", "0002", ...
SCHEMA_REVISION = "0006"


async def schema_revision(connection: AsyncConnection) -> str | None:
    """The database's migration; None when it has none (never migrated)."""
    table = await (await connection.execute("SELECT to_regclass('alembic_version')")).fetchone()
    if table is None or table[0] is None:
        return None
    row = await (await connection.execute("SELECT version_num FROM alembic_version")).fetchone()
    return None if row is None else str(row[0])


def schema_verdict(revision: str | None) -> tuple[bool, str | None]:
    """Whether this code can run on a database at `revision`, and what to tell the operator.

    Newer than the code is usable: migrations are additive (new tables, columns with defaults,
    indexes), so the code of the previous release runs on them during a rolling deploy."""
    if revision == SCHEMA_REVISION:
        return True, None
    if revision is None:
        return (
            False,
            f"the database has no schema, this code needs {SCHEMA_REVISION}: run alembic upgrade head",
        )
    if revision.isdigit() and int(revision) > int(SCHEMA_REVISION):
        return True, (
            f"the database is at migration {revision}, newer than this code ({SCHEMA_REVISION}); "
            f"it runs on it (migrations are additive): deploy the code of migration {revision}"
        )
    if revision.isdigit():
        return False, (
            f"the database is at migration {revision}, older than this code ({SCHEMA_REVISION}): "
            "run alembic upgrade head"
        )
    return False, f"the database is at migration {revision}, which this code does not know"


async def schema_at_start(settings: Settings) -> str | None:
    """At an API's or a worker's start: why it must not start (a schema older than the code), else
    None, also when the database cannot be reached (readiness says so; the pools reconnect)."""
    try:
        async with asyncio.timeout(START_CHECK_TIMEOUT_S):
            connection = await psycopg.AsyncConnection.connect(
                conninfo(settings), **connection_kwargs(settings, f"llmq-start-{os.getpid()}")
            )
            async with connection:
                revision = await schema_revision(connection)
    except Exception as exc:
        log.warning("could not read the database's migration at start (%s): starting", type(exc).__name__)
        return None
    usable, note = schema_verdict(revision)
    if usable and note:
        log.warning("%s", note)
    return None if usable else note


async def _check_postgres(db: Database) -> ComponentHealth:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), db.connection() as connection:
            revision = await schema_revision(connection)
    except Exception as exc:
        return _report(
            "postgres", "Postgres unreachable (cause in the API's log)", f"{type(exc).__name__}: {exc}"
        )
    usable, note = schema_verdict(revision)
    if usable:  # a note (a newer database) goes with a ready answer; the log has it once
        _report("postgres", None)
        return ComponentHealth(ok=True, detail=note)
    return _report("postgres", note)


async def _check_redis(url: str) -> ComponentHealth:
    client = aioredis.from_url(url, socket_connect_timeout=CHECK_TIMEOUT_S, socket_timeout=CHECK_TIMEOUT_S)
    try:
        await asyncio.wait_for(client.ping(), CHECK_TIMEOUT_S)
        return _report("redis", None)
    except Exception as exc:
        return _report("redis", "Redis unreachable (cause in the API's log)", f"{type(exc).__name__}: {exc}")
    finally:
        await client.aclose()


async def _check_triton(admin: TritonAdmin, ready_window_s: float) -> ComponentHealth:
    # Jobs are still accepted while it is down (for models seen ready lately): they wait for it.
    waiting = (
        f"; jobs for models seen ready in the last {ready_window_s:g} s are accepted and wait for it"
        if ready_window_s > 0
        else ""
    )
    try:
        if await asyncio.wait_for(admin.server_ready(), CHECK_TIMEOUT_S):
            return _report("triton", None)
        return _report("triton", f"Triton is not ready{waiting}", f"Triton at {admin.base_url} is not ready")
    except TritonUnavailable as exc:
        return _report("triton", f"Triton is down: unreachable (cause in the API's log){waiting}", str(exc))
    except TimeoutError:
        return _report(
            "triton",
            f"Triton is down: no answer within {CHECK_TIMEOUT_S:g}s{waiting}",
            f"Triton at {admin.base_url}: no answer within {CHECK_TIMEOUT_S:g}s",
        )


@router.get("", response_model=dict[str, str])
async def alive() -> dict[str, str]:
    """Liveness: the API process is up (checks nothing else)."""
    return {"status": "ok"}


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(rt: Runtime = Depends(runtime)) -> JSONResponse:
    """Readiness: Postgres, Redis and Triton each reported; 503 when any of them is down."""
    postgres, redis_health, triton = await asyncio.gather(
        _check_postgres(rt.db),
        _check_redis(rt.settings.REDIS_URL),
        _check_triton(rt.triton_admin, rt.settings.MODEL_READY_WINDOW_S),
    )
    components = {"postgres": postgres, "redis": redis_health, "triton": triton}
    ok = all(c.ok for c in components.values())
    body = Readiness(status="ready" if ok else "unavailable", components=components)
    return JSONResponse(status_code=200 if ok else 503, content=body.model_dump())
