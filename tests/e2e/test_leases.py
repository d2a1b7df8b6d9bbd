"""Leases and the one sweeper, with real worker processes killed by SIGKILL and the default lease,
sweep and request-timeout settings: a dead worker's jobs run again on another worker within 20 s,
exactly one worker sweeps at a time, and nothing of a killed worker stays behind."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from devstack.processes import ManagedProcess, worker_process

from app.config import Settings
from app.db import SyncDatabase
from tests.conftest import E2E_DB, PG_BASE, SLOW_MODEL
from tests.db_utils import recreate_database
from tests.e2e.helpers import ring
from worker.job_store import JobStore
from worker.sweeper import LOCK_KEY

RUN_S = 4.5  # one job: 300 tokens at the slow model's 15 ms each


@pytest.fixture(scope="module")
def lease_db() -> str:
    # A database of its own: the session's worker sweeps the e2e database every second.
    return recreate_database(PG_BASE, f"{E2E_DB}_leases")


def _conn(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def _insert(
    url: str, n: int, params: str = '{"max_tokens": 300, "ignore_eos": true, "seed": 1}'
) -> list[str]:
    with _conn(url) as conn:
        context_id = conn.execute(
            "INSERT INTO context (id, tenant, content) VALUES (gen_random_uuid(), 'default', 'lease me') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        rows = conn.execute(
            "INSERT INTO result (id, tenant, context_id, model, params) "
            "SELECT gen_random_uuid(), 'default', %s, %s, %s::jsonb FROM generate_series(1, %s) RETURNING id::text",
            (context_id, SLOW_MODEL, params, n),
        ).fetchall()
    return [r[0] for r in rows]


def _rows(url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    with _conn(url) as conn:
        cur = conn.execute("SELECT id::text AS rid, * FROM result WHERE id = ANY(%s::uuid[])", (ids,))
        names = [d.name for d in cur.description or ()]
        return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def _sweeper_locks(url: str) -> tuple[list[int], set[int]]:
    """(worker pids whose session holds the sweeper's lock, worker pids with a sweeper session)."""
    with _conn(url) as conn:
        rows = conn.execute(
            "SELECT l.granted, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.objid::bigint = %s AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())",
            (LOCK_KEY,),
        ).fetchall()
        sessions = conn.execute(
            "SELECT application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'llmq-sweeper-%%'"
        ).fetchall()
    holders = [int(name.rsplit("-", 1)[1]) for granted, name in rows if granted]
    assert all(granted for granted, _ in rows), rows  # the others ask again later, never wait in Postgres
    return holders, {int(name.rsplit("-", 1)[1]) for (name,) in sessions}


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def workers(e2e_env: dict[str, str], logs_dir: Path, lease_db: str) -> Iterator[list[ManagedProcess]]:
    env = {
        **e2e_env,
        "DATABASE_URL": lease_db,
        "CELERY_QUEUE": e2e_env["CELERY_QUEUE"] + "-leases",
        "WORKER_IN_FLIGHT": "4",
    }
    for name in ("SWEEP_INTERVAL_S", "SWEEP_REQUEUE_AFTER_S"):  # the defaults, as deployed
        env.pop(name)
    procs = [worker_process(env, logs_dir / f"lease-worker-{i}.log").start() for i in range(3)]
    try:
        for proc in procs:
            proc.wait_for_log("ready.", timeout_s=60)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def test_a_killed_workers_jobs_run_again_on_another_within_20_s_and_one_sweeper_leads(
    workers: list[ManagedProcess], lease_db: str, e2e_env: dict[str, str]
) -> None:
    settings = Settings()
    assert (settings.LEASE_S, settings.SWEEP_INTERVAL_S, settings.TRITON_REQUEST_TIMEOUT_S) == (10, 5, 600)
    pids = {w.popen.pid: w for w in workers if w.popen is not None}
    _wait(lambda: len(_sweeper_locks(lease_db)[0]) == 1, 20, "no sweeper")
    (leader_pid,), sessions = _sweeper_locks(lease_db)
    assert leader_pid in pids and sessions == set(pids)  # exactly one sweeps; the other two ask for the lead

    ids = _insert(lease_db, 12)
    for rid in ids:  # a message each (rung together they would share one, and one worker would take it)
        ring(e2e_env["CELERY_QUEUE"] + "-leases", rid)
    prefix = f":{leader_pid}:"
    _wait(
        lambda: any(prefix in (r["lease_owner"] or "") for r in _rows(lease_db, ids).values()),
        20,
        "the leader runs none of the jobs",
    )
    held = [rid for rid, r in _rows(lease_db, ids).items() if prefix in (r["lease_owner"] or "")]
    leader = pids[leader_pid]
    os.kill(leader_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert leader.popen is not None
    leader.popen.wait(timeout=10)
    with pytest.raises(ProcessLookupError):  # nothing of the killed worker is left (no beat child)
        os.killpg(leader_pid, 0)

    # Another worker sweeps at once (Postgres freed the dead session's lock).
    _wait(lambda: len(_sweeper_locks(lease_db)[0]) == 1, 5, "no sweeper took over")
    (new_leader,), sessions = _sweeper_locks(lease_db)
    assert new_leader != leader_pid and new_leader in pids and sessions == set(pids) - {leader_pid}

    done_at: dict[str, float] = {}

    def all_done() -> bool:
        for rid, row in _rows(lease_db, ids).items():
            if row["status"] != "pending":
                done_at.setdefault(rid, time.monotonic() - killed_at)
        return len(done_at) == len(ids)

    _wait(all_done, 60, "jobs still pending")
    rows = _rows(lease_db, ids)
    assert all(r["status"] == "completed" for r in rows.values()), rows
    recovery = {rid: done_at[rid] for rid in held}
    print(
        f"killed worker held {len(held)} jobs; done again {sorted(round(s, 1) for s in recovery.values())} s after the kill"
    )
    assert max(recovery.values()) <= 20 + RUN_S + 2, recovery  # 20 s plus the job's own run time
    for rid in held:
        assert rows[rid]["attempts"] == 2 and prefix not in rows[rid]["lease_owner"], rows[rid]

    # A killed worker that did not sweep leaves no session behind either (a backend waiting for the
    # lock would not have seen its client die, and held a connection until it got the lock).
    (follower_pid,) = set(pids) - {leader_pid, new_leader}
    os.kill(follower_pid, signal.SIGKILL)
    _wait(
        lambda: _sweeper_locks(lease_db) == ([new_leader], {new_leader}),
        5,
        "the killed worker's session stays",
    )


def test_a_live_lease_is_never_taken_over_a_lapsed_one_is_and_the_heartbeat_renews_in_one_statement(
    lease_db: str,
) -> None:
    settings = Settings(DATABASE_URL=lease_db, LEASE_S=30, LEASE_RENEW_S=20)
    first, second = JobStore(settings, SyncDatabase(settings)), JobStore(settings, SyncDatabase(settings))
    ids = [uuid.UUID(r) for r in _insert(lease_db, 50, '{"max_tokens": 1}')]
    with ThreadPoolExecutor(max_workers=16) as pool:
        claimed = list(pool.map(first.claim, ids))
        assert all(c is not None for c in claimed)
        assert not any(pool.map(second.claim, ids))  # live leases: nobody else takes them
        assert not any(pool.map(first.claim, ids))  # nor a second message in the same process
    rows = _rows(lease_db, [str(i) for i in ids])
    assert {r["lease_owner"] for r in rows.values()} == {first.owner}
    before = max(r["lease_until"] for r in rows.values())
    time.sleep(0.05)
    first.renew()  # one UPDATE for the 50 leases
    after = _rows(lease_db, [str(i) for i in ids])
    assert min(r["lease_until"] for r in after.values()) > before

    with _conn(lease_db) as conn:  # the first worker "died": its leases lapse
        conn.execute(
            "UPDATE result SET lease_until = now() - interval '1 second' WHERE id = ANY(%s)", (ids[:10],)
        )
    taken = [second.claim(rid) for rid in ids[:10]]
    assert all(t is not None and t.attempts == 2 for t in taken)
    first.renew()  # the first learns it lost them
    assert first.held() == set(ids[10:]) and second.held() == set(ids[:10])
