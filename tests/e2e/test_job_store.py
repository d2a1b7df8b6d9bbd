"""The worker's batched job store against the real database: many threads or coroutines, one winner
per job."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import Engine, create_engine, text

from app.config import Settings
from app.db import SyncDatabase
from app.notify import done_channel, parse_notice
from app.schemas import ResultOut
from worker.job_store import JobStore, Outcome, final_notice


@pytest.fixture
def engine(e2e_db_url: str) -> Iterator[Engine]:
    eng = create_engine(e2e_db_url, pool_size=20, connect_args={"options": "-c timezone=UTC"})
    yield eng
    eng.dispose()


def _pending(engine: Engine, n: int) -> list[uuid.UUID]:
    with engine.begin() as conn:
        context_id = conn.execute(
            text(
                "INSERT INTO context (id, tenant, content) VALUES (gen_random_uuid(), 'default', 'store test') RETURNING id"
            )
        ).scalar_one()
        return [
            row[0]
            for row in conn.execute(
                text(
                    "INSERT INTO result (id, tenant, context_id, model) "
                    "SELECT gen_random_uuid(), 'default', :c, 'sim-llm' FROM generate_series(1, :n) RETURNING id"
                ),
                {"c": context_id, "n": n},
            )
        ]


def test_concurrent_claims_and_writes_are_batched_and_won_once(engine: Engine, e2e_db_url: str) -> None:
    settings = Settings(DATABASE_URL=e2e_db_url)
    store = JobStore(settings, SyncDatabase(settings))
    ids = _pending(engine, 200)
    # Every job claimed by 4 threads at once (as if its message were delivered 4 times).
    with ThreadPoolExecutor(max_workers=64) as pool:
        claims = list(pool.map(store.claim, [rid for rid in ids for _ in range(4)]))
    winners = [c for c in claims if c is not None]
    assert sorted(c.result_id for c in winners) == sorted(ids)
    assert all(c.attempts == 1 and c.prompt == "store test" for c in winners)

    half = len(ids) // 2
    with ThreadPoolExecutor(max_workers=64) as pool:
        done = list(
            pool.map(lambda rid: store.complete(rid, Outcome(f"out {rid}", "length", 2, 3)), ids[:half] * 2)
        )
        failed = list(pool.map(lambda rid: store.fail(rid, f"err {rid}"), ids[half:] + ids[:10]))
    assert done.count(True) == half  # each completion written once, duplicates refused
    assert failed.count(True) == len(ids) - half  # the 10 already completed stay completed
    with engine.connect() as conn:
        rows = {
            r.id: r for r in conn.execute(text("SELECT * FROM result WHERE id = ANY(:ids)"), {"ids": ids})
        }
    for rid in ids[:half]:
        assert (rows[rid].status, rows[rid].output, rows[rid].completion_tokens) == (
            "completed",
            f"out {rid}",
            3,
        )
    for rid in ids[half:]:
        assert (rows[rid].status, rows[rid].error) == ("failed", f"err {rid}")


def test_a_nul_in_one_output_does_not_fail_the_batch_it_is_written_with(
    engine: Engine, e2e_db_url: str
) -> None:
    """Postgres text cannot hold NUL, which a model may generate: that output is stored with U+FFFD in
    its place, and the outcomes written in the same statement are written too (text outside ASCII
    unchanged)."""
    settings = Settings(DATABASE_URL=e2e_db_url)
    store = JobStore(settings, SyncDatabase(settings))
    ids = _pending(engine, 30)
    with ThreadPoolExecutor(max_workers=30) as pool:
        assert all(pool.map(store.claim, ids))
        outputs = {rid: f"out \u00e9\U0001f642 {i}" for i, rid in enumerate(ids)}
        outputs[ids[7]] = "a\x00b"
        errors = {rid: f"err \x00 {rid}" for rid in ids[20:]}
        done = list(pool.map(lambda rid: store.complete(rid, Outcome(outputs[rid], "stop", 2, 3)), ids[:20]))
        failed = list(pool.map(lambda rid: store.fail(rid, errors[rid]), ids[20:]))
    assert all(done) and all(failed)
    with engine.connect() as conn:
        rows = {
            r.id: r for r in conn.execute(text("SELECT * FROM result WHERE id = ANY(:ids)"), {"ids": ids})
        }
    assert rows[ids[7]].output == "a\ufffdb"
    assert all(rows[rid].output == outputs[rid] for rid in ids[:20] if rid != ids[7])
    assert all((rows[rid].status, rows[rid].error) == ("failed", f"err \ufffd {rid}") for rid in ids[20:])


def test_coroutines_claim_and_write_through_the_same_batches(engine: Engine, e2e_db_url: str) -> None:
    """The worker's jobs are coroutines on one loop: their answers come back on that loop."""
    settings = Settings(DATABASE_URL=e2e_db_url)
    store = JobStore(settings, SyncDatabase(settings))
    ids = _pending(engine, 200)

    async def run() -> tuple[list[object], list[bool], list[bool]]:
        # Every job claimed 3 times at once, as if its message were delivered 3 times.
        claims = await asyncio.gather(*(store.aclaim(rid) for rid in ids for _ in range(3)))
        done = await asyncio.gather(
            *(store.acomplete(rid, Outcome(f"out {rid}", "stop", 1, 2)) for rid in ids[:150])
        )
        # The first 20 again (refused: already completed), and the last 50 failed.
        failed = await asyncio.gather(*(store.afail(rid, f"err {rid}") for rid in ids[:20] + ids[150:]))
        return list(claims), list(done), list(failed)

    claims, done, failed = asyncio.run(run())
    winners = [c for c in claims if c is not None]
    assert sorted(c.result_id for c in winners) == sorted(ids)  # type: ignore[attr-defined]
    assert all(done) and failed.count(True) == 50 and not any(failed[:20])
    with engine.connect() as conn:
        status = dict(
            conn.execute(text("SELECT id, status FROM result WHERE id = ANY(:ids)"), {"ids": ids}).all()
        )
    assert [status[rid] for rid in ids] == ["completed"] * 150 + ["failed"] * 50


def _store_backends(engine: Engine, select: str, where: str = "") -> int:
    """`select` (an aggregate) over the Postgres sessions of this process's job store."""
    with engine.begin() as conn:
        query = f"SELECT {select} FROM pg_stat_activity WHERE application_name = :name {where}"
        return int(conn.execute(text(query), {"name": f"llmq-worker-{os.getpid()}"}).scalar_one())


def _wait_for_a_lock_wait(engine: Engine) -> None:
    """Until this process's store connection waits for a row lock."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _store_backends(engine, "count(*)", "AND wait_event_type = 'Lock'"):
            return
        time.sleep(0.02)
    raise AssertionError("the store never waited for the row lock")


def test_a_claim_does_not_wait_for_the_outcomes_written_in_its_batch(engine: Engine, e2e_db_url: str) -> None:
    """A job starts as soon as its claim is committed, even when its batch also writes an outcome
    that takes long (here: a row another transaction holds locked)."""
    settings = Settings(DATABASE_URL=e2e_db_url)
    store = JobStore(settings, SyncDatabase(settings))
    first, slow, fresh = _pending(engine, 3)
    assert store.claim(first) is not None and store.claim(slow) is not None
    lock_first, lock_slow = engine.connect(), engine.connect()
    pool = ThreadPoolExecutor(max_workers=3)
    try:
        for conn, rid in ((lock_first, first), (lock_slow, slow)):
            conn.execute(text("SELECT 1 FROM result WHERE id = :id FOR UPDATE"), {"id": rid})
        # The store's thread waits on `first`'s row lock; meanwhile the next batch gathers a claim
        # and `slow`'s outcome, which will wait on its own row lock.
        blocked = pool.submit(store.complete, first, Outcome("a", "stop", 1, 1))
        _wait_for_a_lock_wait(engine)
        written = pool.submit(store.complete, slow, Outcome("b", "stop", 1, 1))
        claim = pool.submit(store.claim, fresh)
        time.sleep(0.3)
        lock_first.commit()
        assert blocked.result(timeout=5)
        claimed = claim.result(timeout=5)  # before `slow`'s row is free
        assert claimed is not None and claimed.result_id == fresh
        assert not written.done()
        lock_slow.commit()
        assert written.result(timeout=5)
    finally:
        lock_first.close()
        lock_slow.close()
        pool.shutdown()


def test_the_lease_heartbeat_skips_a_locked_row_instead_of_waiting(engine: Engine, e2e_db_url: str) -> None:
    """The heartbeat renews every lease in one statement while the batched writes update the same rows
    in another order: waiting for their locks made a deadlock (a 1 s stall of the store, then an
    error). A row held locked is skipped and kept; the next beat renews it."""
    settings = Settings(DATABASE_URL=e2e_db_url)
    store = JobStore(settings, SyncDatabase(settings))
    locked, free = _pending(engine, 2)
    assert store.claim(locked) is not None and store.claim(free) is not None
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE result SET lease_until = now() WHERE id = ANY(:ids)"), {"ids": [locked, free]}
        )
    holder = engine.connect()
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        holder.execute(text("SELECT 1 FROM result WHERE id = :id FOR UPDATE"), {"id": locked})
        pool.submit(store.renew).result(timeout=5)  # does not wait for the lock
        assert store.held() == {locked, free}
        with engine.connect() as conn:
            renewed = dict(
                conn.execute(
                    text("SELECT id, lease_until > now() + interval '5 s' FROM result WHERE id = ANY(:ids)"),
                    {"ids": [locked, free]},
                ).all()
            )
        assert renewed == {locked: False, free: True}
        holder.commit()
        store.renew()
        with engine.connect() as conn:
            later = conn.execute(
                text("SELECT lease_until > now() + interval '5 s' FROM result WHERE id = :id"), {"id": locked}
            ).scalar_one()
        assert later
    finally:
        holder.close()
        pool.shutdown()


def test_a_broken_connection_is_replaced_and_its_batch_written(engine: Engine, e2e_db_url: str) -> None:
    """Postgres restarts or kills the store's backend: the batch it broke is kept and written again
    on a new connection (its writers only wait), and the next batches run there too."""
    settings = Settings(DATABASE_URL=e2e_db_url)
    store = JobStore(settings, SyncDatabase(settings))
    first, second, third = _pending(engine, 3)
    assert store.claim(first) is not None
    killed = _store_backends(engine, "count(pg_terminate_backend(pid))")
    assert killed >= 1
    again = store.claim(second)
    assert again is not None and again.result_id == second
    claimed = store.claim(third)
    assert claimed is not None and claimed.result_id == third
    assert store.complete(third, Outcome("done", "stop", 1, 1))
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, status FROM result WHERE id = ANY(:ids)"), {"ids": [second, third]}
        )
        states = {rid: status for rid, status in rows}
    assert states == {second: "pending", third: "completed"}  # `second` claimed, still running


def test_notices_carry_the_final_rows_as_the_api_renders_them(engine: Engine, e2e_db_url: str) -> None:
    settings = Settings(DATABASE_URL=e2e_db_url)
    store = JobStore(settings, SyncDatabase(settings))
    done, failed = _pending(engine, 2)
    subscriber = redis.Redis.from_url(settings.REDIS_URL).pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(done_channel(settings))
    try:
        assert store.claim(done) is not None and store.claim(failed) is not None
        assert store.complete(done, Outcome("the text", "length", 5, 7))
        assert store.fail(failed, "the reason")
        notices = {}
        deadline = time.monotonic() + 5
        while len(notices) < 2 and time.monotonic() < deadline:
            message = subscriber.get_message(timeout=0.5)
            if message is not None:
                key, row = parse_notice(message["data"])
                notices[key] = row
    finally:
        subscriber.close()
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(text("SELECT * FROM result WHERE id = ANY(:ids)"), {"ids": [done, failed]})
        }
    for rid in (done, failed):
        expected = ResultOut.model_validate(rows[rid]).model_dump_json().encode()
        assert notices[str(rid)] == expected  # byte for byte what GET /results/{id} answers
    assert json.loads(notices[str(done)])["output"] == "the text"
    assert json.loads(notices[str(failed)])["error"] == "the reason"


def test_a_row_that_cannot_be_rendered_still_gets_an_id_notice(caplog: pytest.LogCaptureFixture) -> None:
    rid = uuid.uuid4()
    with caplog.at_level(logging.ERROR, logger="worker.job_store"):
        assert parse_notice(final_notice(rid, {"id": rid, "status": "completed"})) == (str(rid), None)
    assert "not renderable" in caplog.text


def test_a_streamed_job_cancelled_before_its_first_token_ends_abort_at_once(
    engine: Engine, e2e_db_url: str
) -> None:
    """Its cancel waits for the worker's record of what the stream showed: with nothing shown yet
    the worker still records it (finish_reason abort), so the cancel is not left to its timeout."""
    from app.repositories.results import _CANCEL
    from app.triton.inference import Generation
    from worker.jobs import record_stop
    from worker.runtime import Stopped

    settings = Settings(DATABASE_URL=e2e_db_url)
    store = JobStore(settings, SyncDatabase(settings))
    streamed, plain = _pending(engine, 2)
    with engine.begin() as conn:
        conn.execute(text("UPDATE result SET params = '{\"stream\": true}' WHERE id = :i"), {"i": streamed})
    jobs = [store.claim(rid) for rid in (streamed, plain)]
    with engine.begin() as conn:
        for rid in (streamed, plain):
            conn.exec_driver_sql(_CANCEL, {"id": rid, "tenant": None})
    for job in jobs:
        assert job is not None
        record_stop(settings, job, Stopped("cancelled", Generation("", None, None, None)))
    with engine.connect() as conn:
        rows = dict(
            conn.execute(
                text("SELECT id, finish_reason FROM result WHERE id = ANY(:ids)"), {"ids": [streamed, plain]}
            ).all()
        )
    assert rows == {streamed: "abort", plain: "abort"}  # the plain one's from the cancel itself


def test_a_claim_says_whether_the_job_ran_before_also_when_its_attempt_was_given_back(
    engine: Engine, e2e_db_url: str
) -> None:
    # A run given back without spending its attempt (Triton unreachable) may have streamed text:
    # the next run must know, though its attempt number is 1 again.
    settings = Settings(DATABASE_URL=e2e_db_url)
    store = JobStore(settings, SyncDatabase(settings))
    outage, retried, fresh = _pending(engine, 3)
    first = {rid: store.claim(rid) for rid in (outage, retried, fresh)}
    assert all(job is not None and not job.ran_before for job in first.values())
    store.release(outage, "waiting for Triton: unreachable", spend_attempt=False)
    store.release(retried, "attempt 1 failed, retrying")
    again_outage, again_retried = store.claim(outage), store.claim(retried)
    assert again_outage is not None and (again_outage.attempts, again_outage.ran_before) == (1, True)
    assert again_retried is not None and (again_retried.attempts, again_retried.ran_before) == (2, True)
