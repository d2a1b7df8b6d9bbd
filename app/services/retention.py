"""Retention: results and contexts are kept until an operator purges them (`python -m app.cli results purge`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app.db import AsyncConnection
from app.repositories import contexts as contexts_repo
from app.repositories import results as results_repo

BATCH = 5_000


@dataclass(frozen=True)
class Purged:
    results: int
    contexts: int


async def purge(
    conn: AsyncConnection, before: datetime, tenant: str | None, *, dry_run: bool = False, batch: int = BATCH
) -> Purged:
    """Delete the ended results (completed, failed, cancelled) created before `before`, then the
    contexts created before it that no result refers to: a pending job and its context stay, and so
    does a context a job is sent on while the purge runs. `dry_run`: count what a run would delete."""
    if dry_run:
        return Purged(
            await results_repo.count_purgeable(conn, before, tenant),
            await contexts_repo.count_unused_after_purge(conn, before, tenant),
        )
    results = contexts = 0
    while deleted := await results_repo.purge_finished(conn, before, tenant, batch):
        results += deleted
    while True:
        taken, deleted = await contexts_repo.purge_unused(conn, before, tenant, batch)
        if not taken:
            return Purged(results, contexts)
        contexts += deleted
