"""What the routes depend on: the process's runtime objects, held by the app."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from app.auth import KeyRing
from app.config import Settings
from app.db import Database
from app.notify import ResultWaiter
from app.queue import JobQueue
from app.quotas import SubmitRate
from app.services.results import Enqueue
from app.triton.admin import ModelCatalog, TritonAdmin


@dataclass
class Runtime:
    settings: Settings
    db: Database
    job_queue: JobQueue
    enqueue: Enqueue
    waiter: ResultWaiter
    triton_admin: TritonAdmin
    model_catalog: ModelCatalog
    keyring: KeyRing
    submit_rate: SubmitRate


async def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt
