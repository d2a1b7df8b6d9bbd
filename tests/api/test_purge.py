"""The operator's purge against a live API: submits racing it, the rows API processes keep, and
`Idempotency-Key` replays. Real Postgres (two connections where the interleaving matters), real
Redis, the real CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.rows import dict_row

from app.config import get_settings
from app.notify import ResultWaiter, done_channel, purge_notice
from app.repositories import results as results_repo
from app.schemas import ResultOut
from app.services import retention
from tests.conftest import FAST_MODEL, InProcessApi

ROOT = Path(__file__).resolve().parents[2]
OLD = datetime(2020, 3, 1, tzinfo=UTC)
CUT = datetime(2020, 6, 1, tzinfo=UTC)

pytestmark = pytest.mark.anyio


def _purge_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "results", "purge", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _connect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )


async def _old_context(db: psycopg.AsyncConnection[Any], tenant: str) -> uuid.UUID:
    row = await (
        await db.execute(
            "INSERT INTO context (id, tenant, content, created_at) VALUES (gen_random_uuid(), %s, 'c', %s) RETURNING id",
            (tenant, OLD),
        )
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


async def _exists(db: psycopg.AsyncConnection[Any], table: str, row_id: uuid.UUID) -> bool:
    found = await (await db.execute(f"SELECT 1 FROM {table} WHERE id = %s", (row_id,))).fetchone()
    return found is not None


async def test_a_purge_skips_a_context_a_submit_is_inserting_a_result_for(
    api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    """The submit's transaction holds its key check's lock on the context when the purge reaches it,
    and commits while the purge runs: the purge completes and the context stays."""
    tenant = f"race-{uuid.uuid4().hex[:8]}"
    sent_on = await _old_context(db, tenant)
    unused = await _old_context(db, tenant)
    submitter, purger = await _connect(api_db_url), await _connect(api_db_url)
    try:
        row = results_repo.NewResult(uuid.uuid4(), tenant, sent_on, FAST_MODEL, {"max_tokens": 1})
        async with submitter.transaction():
            assert row.id in await results_repo.insert_for_contexts(submitter, [row])
            purge = asyncio.create_task(retention.purge(purger, CUT, tenant, batch=1))
            await asyncio.sleep(0.5)  # the purge is at the locked context by now
        done = await asyncio.wait_for(purge, 10)
    finally:
        await submitter.close()
        await purger.close()
    assert done == retention.Purged(results=0, contexts=1)
    assert await _exists(db, "context", sent_on) and await _exists(db, "result", row.id)
    assert not await _exists(db, "context", unused)


@pytest.mark.parametrize("idempotent", [False, True], ids=["submit", "idempotent-submit"])
async def test_a_submit_whose_context_is_purged_under_it_is_a_404_not_a_500(
    api_app: InProcessApi, api_db_url: str, db: psycopg.AsyncConnection[Any], idempotent: bool
) -> None:
    """The purge deletes the context after the submit's statement has read it and before its key
    check: the submit waits for the purge's transaction, then answers as for a missing context."""
    context_id = await _old_context(db, api_app.tenant)
    purger = await _connect(api_db_url)
    try:
        async with purger.transaction():
            await purger.execute("DELETE FROM context WHERE id = %s", (context_id,))
            # A snapshot from before the delete commits: the submit's read still finds the context.
            await db.execute("SELECT 1")
            headers = {"Idempotency-Key": uuid.uuid4().hex} if idempotent else {}
            sent = asyncio.create_task(
                api_app.user.post(
                    f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 4}, headers=headers
                )
            )
            await asyncio.sleep(0.5)  # its key check waits on the deleted row's lock by now
            assert not sent.done()
        answer = await asyncio.wait_for(sent, 10)
    finally:
        await purger.close()
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"] == f"context {context_id} not found", answer.text
    count = await (await db.execute("SELECT count(*) FROM result")).fetchone()
    assert count == (0,)


async def test_submits_through_the_api_during_a_purge_get_202_or_404_and_the_purge_completes(
    api_app: InProcessApi, api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    """Concurrent submits on old contexts while the purge deletes them in small batches, a few rounds."""
    tenant = api_app.tenant

    async def send(context_id: uuid.UUID) -> int:
        answer = await api_app.user.post(f"/models/send/{FAST_MODEL}/{context_id}", json={"max_tokens": 1})
        return answer.status_code

    for _ in range(3):
        await db.execute("TRUNCATE result, context")
        await db.execute(
            "INSERT INTO context (id, tenant, content, created_at) "
            "SELECT gen_random_uuid(), %s, 'c', %s FROM generate_series(1, 3000)",
            (tenant, OLD),
        )
        ids = [r[0] for r in await (await db.execute("SELECT id FROM context ORDER BY id")).fetchall()]
        targets = ids[:: len(ids) // 300][:300]
        purger = await _connect(api_db_url)
        try:
            purge = asyncio.create_task(retention.purge(purger, CUT, tenant, batch=20))
            codes = await asyncio.gather(*(send(t) for t in targets))
            done = await asyncio.wait_for(purge, 60)
        finally:
            await purger.close()
        assert set(codes) <= {202, 404}, codes
        # Every accepted job kept its context; every refused one found it gone.
        sent_on = {r[0] for r in await (await db.execute("SELECT context_id FROM result")).fetchall()}
        assert len(sent_on) == codes.count(202)
        left = {r[0] for r in await (await db.execute("SELECT id FROM context")).fetchall()}
        assert left == sent_on
        assert done.contexts == len(ids) - len(sent_on)


async def _finished_and_known(api_app: InProcessApi, db: psycopg.AsyncConnection[Any]) -> str:
    """A job of this process, finished and announced with its row, as its worker would."""
    context = await api_app.user.post("/contexts/", json={"content": "keep me briefly"})
    sent = await api_app.user.post(
        f"/models/send/{FAST_MODEL}/{context.json()['id']}", json={"max_tokens": 4}
    )
    result_id = sent.json()["result_id"]
    cur = db.cursor(row_factory=dict_row)
    row = await (
        await cur.execute(
            "UPDATE result SET status = 'completed', output = 'secret', finished_at = now() WHERE id = %s RETURNING *",
            (result_id,),
        )
    ).fetchone()
    waiter = api_app.app.state.runtime.waiter
    await waiter.listening()
    settings = get_settings()
    message = str(result_id).encode() + b"\n" + ResultOut.model_validate(row).model_dump_json().encode()
    publisher = aioredis.from_url(settings.REDIS_URL)
    try:
        for _ in range(100):  # until this process's subscription has it
            await publisher.publish(done_channel(settings), message)
            await asyncio.sleep(0.02)
            if waiter.known(uuid.UUID(result_id), None):
                break
    finally:
        await publisher.aclose()
    return str(result_id)


async def test_a_purged_result_is_not_served_from_the_api_processs_memory(
    api_app: InProcessApi, api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    result_id = await _finished_and_known(api_app, db)
    assert api_app.app.state.runtime.waiter.known(uuid.UUID(result_id), None)
    before = await api_app.user.get(f"/results/{result_id}")
    assert before.status_code == 200 and before.json()["output"] == "secret"
    cut = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    done = await asyncio.to_thread(_purge_cli, api_db_url, "--before", cut)
    assert done.returncode == 0, done.stderr
    assert "deleted 1 results and 1 contexts" in done.stdout and done.stderr == ""
    assert not await _exists(db, "result", uuid.UUID(result_id))
    for _ in range(50):  # the notice goes through Redis
        answer = await api_app.user.get(f"/results/{result_id}")
        if answer.status_code == 404:
            break
        await asyncio.sleep(0.05)
    assert answer.status_code == 404, answer.text


async def test_the_waiter_keeps_no_row_older_than_a_purge_and_none_for_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waiter = ResultWaiter(get_settings().REDIS_URL, "unused")

    def row(created: datetime) -> tuple[uuid.UUID, bytes]:
        rid = uuid.uuid4()
        params = '{"stop":["\\"created_at\\":\\"2999-01-01T00:00:00Z\\""]}'
        body = (
            f'{{"id":"{rid}","tenant":"t","params":{params},"status":"completed",'
            f'"created_at":"{created.isoformat()}","updated_at":"{created.isoformat()}"}}'
        )
        return rid, body.encode()

    kept, body = row(OLD)
    waiter._notice(str(kept).encode() + b"\n" + body)
    assert waiter.known(kept, None) == body
    waiter._notice(purge_notice(CUT))
    assert waiter.known(kept, None) is None
    # A notice that comes after the purge, of a row older than its cut: not kept.
    late, body = row(OLD)
    waiter._notice(str(late).encode() + b"\n" + body)
    assert waiter.known(late, None) is None
    newer, body = row(CUT + timedelta(days=1))
    waiter._notice(str(newer).encode() + b"\n" + body)
    assert waiter.known(newer, None) == body
    monkeypatch.setattr("app.notify.RECENT_TTL_S", 0.0)
    assert waiter.known(newer, None) is None  # expired


async def test_an_idempotent_context_replay_after_a_purge_creates_it_again(
    api_app: InProcessApi, api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = await api_app.user.post("/contexts/", json={"content": "once"}, headers=key)
    assert first.status_code == 201, first.text
    await db.execute("UPDATE context SET created_at = %s WHERE id = %s", (OLD, first.json()["id"]))
    done = await asyncio.to_thread(_purge_cli, api_db_url, "--before", CUT.isoformat())
    assert done.returncode == 0 and "deleted 0 results and 1 contexts" in done.stdout, done.stdout
    replay = await api_app.user.post("/contexts/", json={"content": "once"}, headers=key)
    assert replay.status_code == 201, replay.text
    assert replay.json()["id"] != first.json()["id"]
    assert (await api_app.user.get(f"/contexts/{replay.json()['id']}")).status_code == 200


async def test_an_idempotent_send_replay_after_its_result_is_purged_sends_again(
    api_app: InProcessApi, api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    context = await api_app.user.post("/contexts/", json={"content": "kept"})
    url, key = f"/models/send/{FAST_MODEL}/{context.json()['id']}", {"Idempotency-Key": uuid.uuid4().hex}
    first = await api_app.user.post(url, json={"max_tokens": 4}, headers=key)
    assert first.status_code == 202, first.text
    await db.execute(
        "UPDATE result SET status = 'completed', finished_at = now(), created_at = %s WHERE id = %s",
        (OLD, first.json()["result_id"]),
    )
    done = await asyncio.to_thread(_purge_cli, api_db_url, "--before", CUT.isoformat())
    assert done.returncode == 0 and "deleted 1 results and 0 contexts" in done.stdout, done.stdout
    replay = await api_app.user.post(url, json={"max_tokens": 4}, headers=key)
    assert replay.status_code == 202, replay.text
    assert replay.json()["result_id"] != first.json()["result_id"]
    assert (await api_app.user.get(f"/results/{replay.json()['result_id']}")).status_code == 200


async def test_a_purge_without_redis_says_api_processes_were_not_told(
    api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    env = {**os.environ, "DATABASE_URL": api_db_url, "REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "results", "purge", "--before", CUT.isoformat()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "deleted 0 results and 0 contexts" in done.stdout, done.stderr
    assert done.stderr.startswith("warning: API processes not told to forget purged results (")
    assert len(done.stderr.splitlines()) == 1 and "60 s" in done.stderr
