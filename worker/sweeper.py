"""The sweeper: one at a time, whatever the number of workers and machines.

Every worker process runs this loop in a thread. It holds a Postgres session advisory lock on a
connection of its own while it sweeps; the others wait for that lock. When the leader dies (even by
kill -9) Postgres ends its session and frees the lock: another worker takes over at once. Nothing
runs outside the worker process, so nothing is left behind when it dies (unlike celery's -B beat).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

import psycopg

from app.config import Settings
from app.db import Connection, connection_kwargs, conninfo
from app.notify import publish_cancels, publish_done
from app.repositories import idempotency
from app.repositories import results as repo
from app.services.idempotency import RETENTION_S
from worker.metrics import worker_metrics

log = logging.getLogger(__name__)

# The advisory lock's key: "llmq" in ASCII; one sweeper per database.
LOCK_KEY = 0x6C6C6D71
# How often a worker that does not sweep asks for the lead (the longest a lead stays free).
LEAD_POLL_S = 1.0
SWEEP_LIMIT = 1000


def sweep_once(
    conn: Connection,
    settings: Settings,
    ring: Callable[[list[uuid.UUID]], object],
    *,
    release_lapsed: bool,
    triton_down: str | None = None,
    waiting: Callable[[], int | None] = lambda: None,
    broker_reset_s: float | None = None,
) -> dict[str, int]:
    """One sweep: jobs past JOB_DEADLINE_S fail (saying so if Triton is unreachable; a running one is
    aborted), jobs whose lease lapsed and jobs whose message was lost are sent again, jobs past their
    own deadline end.
    `broker_reset_s`: Redis lost its keys that long ago, so every job not started since then was lost."""
    why = f"Triton unreachable: {triton_down}" if triton_down else None
    expired, running = repo.fail_expired(conn, deadline_s=settings.JOB_DEADLINE_S, why=why)
    lapsed = repo.release_lapsed(conn, limit=SWEEP_LIMIT) if release_lapsed else []
    # With nothing left in the broker, a job not started for a while had its message lost (taken by a
    # worker that died before claiming it): soon re-sent. With a backlog it may still be queued.
    requeue_after_s = settings.SWEEP_REQUEUE_AFTER_S if waiting() != 0 else settings.SWEEP_LOST_AFTER_S
    if broker_reset_s is not None:
        requeue_after_s = min(requeue_after_s, broker_reset_s)
    lost = repo.requeue_candidates(conn, requeue_after_s=requeue_after_s, limit=SWEEP_LIMIT)
    idempotency.forget_old(conn, RETENTION_S)
    timed_out = repo.cancel_past_deadline(conn)
    publish_cancels(settings, running + timed_out)  # a worker running one of them aborts it
    publish_done(settings, expired + timed_out)
    if lapsed or lost:
        ring(lapsed + lost)
    if expired or lapsed or lost:
        log.warning(
            "sweep: re-enqueued %d jobs whose lease lapsed and %d lost messages, failed %d past the deadline",
            len(lapsed),
            len(lost),
            len(expired),
        )
    return {
        "lapsed": len(lapsed),
        "requeued": len(lost),
        "expired": len(expired),
        "timed_out": len(timed_out),
    }


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        ring: Callable[[list[uuid.UUID]], object],
        triton_down: Callable[[], str | None] = lambda: None,
        waiting: Callable[[], int | None] = lambda: None,
        broker_reset: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.ring = ring
        self.triton_down = triton_down
        self.waiting = waiting
        self.broker_reset = broker_reset
        self._reset_at: float | None = None  # when Redis was seen to have lost its keys
        self.leading = False
        self._stop = threading.Event()
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Give the lead up (a warm shutdown): another worker takes over at once."""
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.cancel_safe()  # ends a sweep in progress
        self._thread.join(timeout=5)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._lead()
                delay = 0.5
            except Exception as exc:  # Postgres down or restarted: connect again
                if self._stop.is_set():
                    break
                if self.leading:
                    log.warning("sweeper: lost the lead: %s", exc)
                else:
                    log.debug("sweeper: cannot wait for the lead: %s", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self.leading = False
                worker_metrics().sweeper_leading.set(0)
        log.info("sweeper stopped")

    def _lead(self) -> None:
        kwargs = connection_kwargs(self.settings, f"llmq-sweeper-{os.getpid()}")
        with psycopg.connect(conninfo(self.settings), **kwargs) as conn:
            self._conn = conn
            try:
                # A session lock, held until this connection ends (or the process dies). Asked for
                # again and again rather than waited for: a backend waiting for a lock does not see
                # its client die, so a killed worker's wait would hold a connection until it got it.
                while not conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:  # type: ignore[index]
                    if self._stop.wait(LEAD_POLL_S):
                        return
                if self._stop.is_set():
                    return
                self.leading = True
                worker_metrics().sweeper_leading.set(1)
                led_since = time.monotonic()
                log.info("sweeper: this worker sweeps (every %gs)", self.settings.SWEEP_INTERVAL_S)
                while not self._stop.is_set():
                    # Leases that lapsed while no one could renew them (Postgres down, or no leader)
                    # get one full lease from now to be renewed before they count as lapsed.
                    release_lapsed = time.monotonic() - led_since >= self.settings.LEASE_S
                    if self.broker_reset():
                        log.warning("sweeper: Redis lost its keys; re-sending every job not started")
                        self._reset_at = time.monotonic()
                    reset_s = None if self._reset_at is None else time.monotonic() - self._reset_at
                    swept = sweep_once(
                        conn,
                        self.settings,
                        self.ring,
                        release_lapsed=release_lapsed,
                        triton_down=self.triton_down(),
                        waiting=self.waiting,
                        broker_reset_s=reset_s,
                    )
                    worker_metrics().swept(swept)
                    if swept["requeued"] < SWEEP_LIMIT:  # all re-sent (a backlog takes several sweeps)
                        self._reset_at = None
                    self._stop.wait(self.settings.SWEEP_INTERVAL_S)
            finally:
                self._conn = None
