"""The worker's database writes, batched across its threads.

Each job thread needs two writes (claim, then the outcome). Done one by one, a worker with
hundreds of jobs in flight spends more CPU on per-statement overhead than on the work; here
the threads queue their requests and wait, and one thread executes whatever has queued up as
one statement per kind, then publishes the completion notices (with the final rows, see
app/notify.py) in one Redis pipeline. Nothing waits for a batch to fill: under light load a
batch is a single job.
A thread still returns only after its write is committed, so the Celery message is acked
after the result is safely in Postgres.

Each kind of write is one autocommit statement on a connection of the process's pool (no
BEGIN/COMMIT round trips). A connection that breaks fails its batch (the jobs are retried by the
sweeper like any lost job) and the pool replaces it.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.db import SyncDatabase
from app.notify import notice, publish_done
from app.repositories import results as repo
from app.schemas import ResultOut

log = logging.getLogger(__name__)

MAX_BATCH = 512


@dataclass(frozen=True)
class ClaimedJob:
    result_id: uuid.UUID
    model: str
    params: dict[str, Any]
    attempts: int
    prompt: str


@dataclass(frozen=True)
class Outcome:
    """What a finished generation writes."""

    output: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass
class _Batch:
    claims: list[tuple[uuid.UUID, Future[Any]]] = field(default_factory=list)
    completions: list[tuple[uuid.UUID, Outcome, Future[Any]]] = field(default_factory=list)
    failures: list[tuple[uuid.UUID, str, Future[Any]]] = field(default_factory=list)

    def futures(self) -> list[Future[Any]]:
        return (
            [f for *_, f in self.claims] + [f for *_, f in self.completions] + [f for *_, f in self.failures]
        )


class JobStore:
    def __init__(self, settings: Settings, db: SyncDatabase) -> None:
        self.settings = settings
        self.db = db
        # A claim older than the longest possible call belongs to a dead worker.
        self.stale_after_s = settings.TRITON_REQUEST_TIMEOUT_S + 60
        self._queue: queue.SimpleQueue[tuple[str, uuid.UUID, Any, Future[Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="job-store", daemon=True)
        self._thread.start()

    def claim(self, result_id: uuid.UUID) -> ClaimedJob | None:
        return self._submit("claim", result_id, None)  # type: ignore[no-any-return]

    def complete(self, result_id: uuid.UUID, outcome: Outcome) -> bool:
        return self._submit("complete", result_id, outcome)  # type: ignore[no-any-return]

    def fail(self, result_id: uuid.UUID, error: str) -> bool:
        return self._submit("fail", result_id, error)  # type: ignore[no-any-return]

    def _submit(self, kind: str, result_id: uuid.UUID, payload: Any) -> Any:
        future: Future[Any] = Future()
        self._queue.put((kind, result_id, payload, future))
        return future.result()

    def _collect(self) -> _Batch:
        batch = _Batch()
        item = self._queue.get()
        for _ in range(MAX_BATCH):
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
        while True:
            batch = self._collect()
            try:
                self._execute(batch)
            except Exception as exc:
                log.exception("job store: batch of %d writes failed", len(batch.futures()))
                for future in batch.futures():
                    if not future.done():
                        future.set_exception(exc)

    def _execute(self, batch: _Batch) -> None:
        # The same id twice in one batch (duplicate messages): only its first request can win.
        claim_ids = list(dict.fromkeys(rid for rid, _ in batch.claims))
        outcomes: dict[uuid.UUID, tuple[str, str | None, int | None, int | None]] = {}
        for rid, o, _ in batch.completions:
            outcomes.setdefault(rid, (o.output, o.finish_reason, o.prompt_tokens, o.completion_tokens))
        errors: dict[uuid.UUID, str] = {}
        for rid, error, _ in batch.failures:
            errors.setdefault(rid, error)
        with self.db.connection() as conn:
            claimed_rows = repo.claim_many(conn, claim_ids, self.stale_after_s) if claim_ids else {}
            completed = repo.complete_many(conn, outcomes)
            failed = repo.fail_many(conn, errors)
        claimed = {
            rid: ClaimedJob(result_id=rid, model=model, params=params, attempts=attempts, prompt=prompt)
            for rid, (model, params, attempts, prompt) in claimed_rows.items()
        }
        publish_done(self.settings, [_notice(rid, row) for rid, row in (completed | failed).items()])

        first: set[uuid.UUID] = set()

        def once(rid: uuid.UUID, won: bool) -> bool:
            if rid in first:
                return False
            first.add(rid)
            return won

        for rid, future in batch.claims:
            future.set_result(claimed.get(rid) if once(rid, rid in claimed) else None)
        first.clear()
        for rid, _, future in batch.completions:
            future.set_result(once(rid, rid in completed))
        first.clear()
        for rid, _, future in batch.failures:
            future.set_result(once(rid, rid in failed))


def _notice(result_id: uuid.UUID, row: dict[str, Any]) -> bytes:
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
