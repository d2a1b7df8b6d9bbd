"""The worker's database writes, batched across its jobs.

Each job needs two writes (claim, then the outcome). Done one by one, a worker with hundreds of
jobs in flight spends more CPU on per-statement overhead than on the work; here the jobs
(coroutines on the runtime's loop, or threads) queue their requests and wait, and one thread
executes whatever has queued up as one statement per kind, then publishes the completion notices
(with the final rows, see app/notify.py) in one Redis pipeline. Nothing waits for a batch to fill:
under light load a batch is a single job. Claims go first and are answered as soon as they are
committed: a job starts without waiting for the outcomes and notices of its batch. A job still
ends only after its write is committed, so the Celery message is acked after the result is safely
in Postgres.

Each kind of write is one autocommit statement on a connection of the process's pool (no
BEGIN/COMMIT round trips). When Postgres cannot be reached the batch is kept and tried again with
backoff until it is written (its jobs wait, so what is kept is bounded by the jobs in flight):
a generated result is written when Postgres is back, never generated again.

A claim is a lease held by this process (`owner`); the heartbeat thread renews the leases of every
job the process holds in one statement every LEASE_RENEW_S. A worker that dies stops renewing: its
jobs' leases lapse after LEASE_S and the sweeper has them run again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.db import DATABASE_ERRORS, SyncDatabase
from app.notify import notice, publish_done
from app.repositories import results as repo
from app.schemas import ResultOut

log = logging.getLogger(__name__)

MAX_BATCH = 512
RETRY_MAX_S = 1.0  # longest wait between two tries of a batch while Postgres is unreachable


def worker_id() -> str:
    """This process's name on its leases: unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"[:128]


@dataclass(frozen=True)
class ClaimedJob:
    result_id: uuid.UUID
    model: str
    params: dict[str, Any]
    attempts: int
    prompt: str
    seconds_left: float | None = None  # before the job's own deadline (`timeout_s`), if it has one
    ran_before: bool = False  # an earlier run may have streamed part of its text


@dataclass(frozen=True)
class Outcome:
    """What a finished generation writes."""

    output: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


# Where a request's answer goes: a thread's future, or a coroutine's (set on its own loop).
Reply = Future[Any] | asyncio.Future[Any]


@dataclass
class _Batch:
    claims: list[tuple[uuid.UUID, Reply]] = field(default_factory=list)
    completions: list[tuple[uuid.UUID, Outcome, Reply]] = field(default_factory=list)
    failures: list[tuple[uuid.UUID, str, Reply]] = field(default_factory=list)

    def futures(self) -> list[Reply]:
        return (
            [f for *_, f in self.claims] + [f for *_, f in self.completions] + [f for *_, f in self.failures]
        )

    def __len__(self) -> int:
        return len(self.claims) + len(self.completions) + len(self.failures)


class JobStore:
    def __init__(self, settings: Settings, db: SyncDatabase) -> None:
        self.settings = settings
        self.db = db
        self.owner = worker_id()
        # The jobs this process holds a lease on: claimed, outcome not yet written.
        self._held: set[uuid.UUID] = set()
        self._held_lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[str, uuid.UUID, Any, Reply]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="job-store", daemon=True)
        self._thread.start()
        self._heartbeat = threading.Thread(target=self._renew_forever, name="lease-heartbeat", daemon=True)
        self._heartbeat.start()

    def claim(self, result_id: uuid.UUID) -> ClaimedJob | None:
        return self._submit("claim", result_id, None)  # type: ignore[no-any-return]

    def complete(self, result_id: uuid.UUID, outcome: Outcome) -> bool:
        return self._submit("complete", result_id, outcome)  # type: ignore[no-any-return]

    def fail(self, result_id: uuid.UUID, error: str) -> bool:
        return self._submit("fail", result_id, error)  # type: ignore[no-any-return]

    async def aclaim(self, result_id: uuid.UUID) -> ClaimedJob | None:
        return await self._await("claim", result_id, None)  # type: ignore[no-any-return]

    async def acomplete(self, result_id: uuid.UUID, outcome: Outcome) -> bool:
        return await self._await("complete", result_id, outcome)  # type: ignore[no-any-return]

    async def afail(self, result_id: uuid.UUID, error: str) -> bool:
        return await self._await("fail", result_id, error)  # type: ignore[no-any-return]

    def release(self, result_id: uuid.UUID, note: str, *, spend_attempt: bool = True) -> bool:
        """Give the job back (to run again later); rare, so not batched."""
        with self._held_lock:
            self._held.discard(result_id)
        with self.db.connection() as conn:
            return repo.release(conn, result_id, note, spend_attempt=spend_attempt)

    def held(self) -> set[uuid.UUID]:
        with self._held_lock:
            return set(self._held)

    def renew(self) -> None:
        """One heartbeat: extend the lease of every job held; forget those that ended elsewhere
        (cancelled, past a deadline) or were taken over."""
        with self._held_lock:
            ids = list(self._held)
        if not ids:
            return
        with self.db.connection() as conn:
            kept = repo.renew_leases(conn, ids, self.owner, self.settings.LEASE_S)
        with self._held_lock:
            self._held.difference_update(set(ids) - kept)

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.settings.LEASE_RENEW_S)
            try:
                self.renew()
            except Exception as exc:  # Postgres down: the next beat tries again
                log.warning("lease heartbeat failed (%d jobs held): %s", len(self._held), exc)

    def _submit(self, kind: str, result_id: uuid.UUID, payload: Any) -> Any:
        future: Future[Any] = Future()
        self._queue.put((kind, result_id, payload, future))
        return future.result()

    async def _await(self, kind: str, result_id: uuid.UUID, payload: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.put((kind, result_id, payload, future))
        return await future

    def _collect(self, batch: _Batch, *, wait: bool = True) -> _Batch:
        """Add what has queued up (waiting for a first request if `wait`) to `batch`."""
        try:
            item = self._queue.get() if wait else self._queue.get_nowait()
        except queue.Empty:
            return batch
        for _ in range(max(1, MAX_BATCH - len(batch))):
            kind, result_id, payload, future = item
            if kind == "claim":
                batch.claims.append((result_id, future))
            elif kind == "complete":
                batch.completions.append((result_id, payload, future))
            else:
                batch.failures.append((result_id, payload, future))
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        else:
            self._queue.put(item)  # over the batch size: next round
        return batch

    def _run(self) -> None:
        batch, delay = _Batch(), 0.0
        while True:
            if delay:
                time.sleep(delay)  # requests keep queuing meanwhile: they join the kept batch
            batch = self._collect(batch, wait=not delay)
            try:
                self._execute(batch)
            except DATABASE_ERRORS as exc:
                # Postgres unreachable: keep the batch (its jobs wait) and try it again.
                delay = min(RETRY_MAX_S, max(0.05, delay * 2))
                log.warning(
                    "job store: %d writes wait for Postgres (next try in %.2fs): %s", len(batch), delay, exc
                )
                continue
            except Exception as exc:
                log.exception("job store: batch of %d writes failed", len(batch))
                _settle([(future, None, exc) for future in batch.futures()])
            if delay:
                log.warning("job store: Postgres is back, %d kept writes done", len(batch))
            batch, delay = _Batch(), 0.0

    def _execute(self, batch: _Batch) -> None:
        # The same id twice in one batch (duplicate messages): only its first request can win.
        with self._held_lock:  # a second message for a job this process runs already: skipped
            claim_ids = [
                rid for rid in dict.fromkeys(rid for rid, _ in batch.claims) if rid not in self._held
            ]
        outcomes: dict[uuid.UUID, tuple[str, str | None, int | None, int | None]] = {}
        for rid, o, _ in batch.completions:
            outcomes.setdefault(rid, (o.output, o.finish_reason, o.prompt_tokens, o.completion_tokens))
        errors: dict[uuid.UUID, str] = {}
        for rid, error, _ in batch.failures:
            errors.setdefault(rid, error)
        with self.db.connection() as conn:
            if batch.claims:
                lease_s, deadline_s = self.settings.LEASE_S, self.settings.JOB_DEADLINE_S
                claimed_rows = (
                    repo.claim_many(conn, claim_ids, self.owner, lease_s, deadline_s) if claim_ids else {}
                )
                with self._held_lock:
                    self._held.update(claimed_rows)
                # The claimed jobs start now, not after the outcomes' statements and notices; done
                # with, the claims are not run again if writing the outcomes has to be tried again.
                self._answer_claims(batch.claims, claimed_rows)
                batch.claims = []
            completed = repo.complete_many(conn, outcomes)
            failed = repo.fail_many(conn, errors)
        with self._held_lock:
            self._held.difference_update(outcomes.keys() | errors.keys())
        publish_done(self.settings, [final_notice(rid, row) for rid, row in (completed | failed).items()])
        _answer_once(
            [(rid, f) for rid, _, f in batch.completions] + [(rid, f) for rid, _, f in batch.failures],
            lambda rid: rid in completed or rid in failed,
            False,
        )

    @staticmethod
    def _answer_claims(claims: list[tuple[uuid.UUID, Reply]], rows: repo.ClaimedRows) -> None:
        jobs = {
            rid: ClaimedJob(rid, model, params, attempts, prompt, left, ran_before)
            for rid, (model, params, attempts, prompt, left, ran_before) in rows.items()
        }
        _answer_once(claims, jobs.get, None)


def _answer_once(
    requests: list[tuple[uuid.UUID, Reply]], answer: Callable[[uuid.UUID], object], loser: object
) -> None:
    """Each request gets its answer, but a second request for the same id in the batch gets `loser`:
    a job runs, and is written, once."""
    seen: set[uuid.UUID] = set()
    replies: list[tuple[Reply, object, BaseException | None]] = []
    for rid, future in requests:
        replies.append((future, loser if rid in seen else answer(rid), None))
        seen.add(rid)
    _settle(replies)


def _settle(replies: list[tuple[Reply, object, BaseException | None]]) -> None:
    """Answer waiting requests: a thread at once, the coroutines of a loop in one wake-up of it
    (one self-pipe write per batch instead of one per job)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Reply, object, BaseException | None]]] = {}
    for reply in replies:
        future = reply[0]
        if isinstance(future, asyncio.Future):
            by_loop.setdefault(future.get_loop(), []).append(reply)
        else:
            _set(*reply)
    for loop, on_loop in by_loop.items():
        loop.call_soon_threadsafe(_set_all, on_loop)


def _set_all(replies: list[tuple[Reply, object, BaseException | None]]) -> None:
    for reply in replies:
        _set(*reply)


def _set(future: Reply, value: object, exc: BaseException | None) -> None:
    if future.done():  # answered already, or its waiter is gone
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def final_notice(result_id: uuid.UUID, row: dict[str, Any]) -> bytes:
    """The notice with the row as the API renders it; without the row if it cannot be rendered
    (the write is committed by now: the waiters then read it from the database)."""
    try:
        return notice(result_id, ResultOut.model_validate(row).model_dump_json().encode())
    except ValueError:  # pydantic's ValidationError
        log.exception("result %s: final row not renderable for its notice", result_id)
        return notice(result_id)


_db: SyncDatabase | None = None
_store: JobStore | None = None
_lock = threading.Lock()


def get_database(settings: Settings) -> SyncDatabase:
    """The process's one pool."""
    global _db
    with _lock:
        if _db is None:
            _db = SyncDatabase(settings)
        return _db


def get_store(settings: Settings) -> JobStore:
    global _store
    db = get_database(settings)
    with _lock:
        if _store is None:
            _store = JobStore(settings, db)
        return _store


def reset_store() -> None:
    """After a fork the pool's connections and the store's thread belong to the parent."""
    global _store, _db
    _store = None
    _db = None
