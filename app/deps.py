"""What the routes depend on: the process's runtime objects, held by the app."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from app.auth import KeyRing, Principal, Unauthenticated
from app.config import Settings
from app.db import Database
from app.metrics import ApiMetrics
from app.notify import CancelNotices, ResultWaiter
from app.queue import JobQueue
from app.quotas import PendingJobs, SubmitRate
from app.services.results import Enqueue, ResultInserts
from app.streams import TokenStreamReader
from app.templates import ChatTemplates
from app.triton.admin import ModelCatalog, TritonAdmin


@dataclass
class Runtime:
    settings: Settings
    db: Database
    inserts: ResultInserts  # new results, batched across concurrent submits
    job_queue: JobQueue
    enqueue: Enqueue
    waiter: ResultWaiter
    triton_admin: TritonAdmin
    model_catalog: ModelCatalog
    keyring: KeyRing
    submit_rate: SubmitRate
    pending: PendingJobs
    templates: ChatTemplates
    cancel_notices: CancelNotices
    token_streams: TokenStreamReader
    metrics: ApiMetrics


async def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


@dataclass(frozen=True)
class Caller:
    """Who calls (found by the Authentication middleware) and the process's runtime: the one
    dependency of every protected operation."""

    principal: Principal
    rt: Runtime
    request: Request  # for the rare operation that watches its connection (a /v1 call's client leaving)


async def caller(request: Request) -> Caller:
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):  # only if the middleware is missing: refuse, never skip
        raise Unauthenticated("missing API key: send the header 'Authorization: Bearer <API key>'")
    rt: Runtime = request.app.state.runtime
    return Caller(principal, rt, request)
