"""The operator's command line (`python -m app.cli`), run as an operator would, on the real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.anyio


def _cli(database_url: str, *args: str, group: str = "keys") -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "MAX_PENDING_PER_TENANT": "10000",
        "SUBMIT_RATE_PER_KEY": "1000",
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", group, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_keys_are_created_listed_and_revoked(api_db_url: str, db: psycopg.AsyncConnection[Any]) -> None:
    made = _cli(api_db_url, "create", "--tenant", "acme", "--name", "ci")
    assert made.returncode == 0, made.stderr
    fields = dict(
        line.split(":", 1) for line in made.stdout.splitlines() if ":" in line and not line.startswith("(")
    )
    key_id, key = fields["id"].strip(), fields["key"].strip()
    assert key.startswith("llmq_")
    listed = _cli(api_db_url, "list")
    assert key_id in listed.stdout and key not in listed.stdout
    assert listed.stdout.splitlines()[0].split()[-2:] == ["state", "name"]
    revoked = _cli(api_db_url, "revoke", key_id)
    assert revoked.returncode == 0 and f"revoked {key_id} (acme, ci)" in revoked.stdout
    again = _cli(api_db_url, "revoke", key_id)
    assert again.returncode == 0 and f"{key_id} (acme, ci) was already revoked at" in again.stdout


async def test_tenant_limits_are_shown_and_set(api_db_url: str, db: psycopg.AsyncConnection[Any]) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    shown = _cli(api_db_url, "show", tenant, group="tenants")
    assert shown.returncode == 0, shown.stderr
    assert "max pending:       10000  (the MAX_PENDING_PER_TENANT setting)" in shown.stdout
    made = _cli(api_db_url, "set", tenant, "--max-pending", "7", group="tenants")
    assert made.returncode == 0, made.stderr
    shown = _cli(api_db_url, "show", tenant, group="tenants")
    assert f"max pending:       7  (set for {tenant})" in shown.stdout
    assert "submit rate (/s):  1000  (the SUBMIT_RATE_PER_KEY setting)" in shown.stdout
    row = await (
        await db.execute(
            "SELECT max_pending, submit_rate_per_s FROM tenant_limits WHERE tenant = %s", (tenant,)
        )
    ).fetchone()
    assert row == (7, None)
    refused = _cli(api_db_url, "set", tenant, "--max-pending", "0", group="tenants")
    assert refused.returncode == 1 and refused.stderr.startswith("error: --max-pending:"), refused.stderr
    refused = _cli(api_db_url, "show", "a b", group="tenants")
    assert refused.returncode == 1 and refused.stderr.startswith("error: tenant:"), refused.stderr


async def test_mistakes_are_one_line_errors_not_tracebacks(
    api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    unreachable = "postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:1/llmq"
    cases = [
        (api_db_url, ("revoke", str(uuid.UUID(int=0))), "not found"),
        (api_db_url, ("create", "--tenant", "a b", "--name", "x"), "--tenant:"),
        (api_db_url, ("create", "--tenant", "acme", "--name", "x", "--scope", "root"), "--scope:"),
        (unreachable, ("list",), "database error: connection"),
        # A name shows on terminals and in listings: no row can be forged, no escape sent.
        (
            api_db_url,
            ("create", "--tenant", "acme", "--name", "a\nfake-id  llmq_AAAA  evil admin active"),
            "--name:",
        ),
        (api_db_url, ("create", "--tenant", "acme", "--name", "\x1b[31mred"), "--name:"),
        (api_db_url, ("create", "--tenant", "acme", "--name", "   "), "blank"),
        ("garbage", ("list",), "invalid settings: DATABASE_URL"),
    ]
    for url, args, message in cases:
        done = _cli(url, *args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.startswith("error: ") and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
        assert "s3cret-pw" not in done.stderr


async def test_old_results_and_unused_contexts_are_purged_in_batches_pending_jobs_stay(
    api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    tenant, other = f"old-{uuid.uuid4().hex[:8]}", f"kept-{uuid.uuid4().hex[:8]}"

    async def context(owner: str, created: str) -> uuid.UUID:
        row = await (
            await db.execute(
                "INSERT INTO context (id, tenant, content, created_at) VALUES (gen_random_uuid(), %s, 'c', %s) RETURNING id",
                (owner, created),
            )
        ).fetchone()
        assert row is not None
        return uuid.UUID(str(row[0]))

    async def result(owner: str, context_id: uuid.UUID, status: str, created: str) -> uuid.UUID:
        row = await (
            await db.execute(
                "INSERT INTO result (id, tenant, context_id, model, params, status, created_at) "
                "VALUES (gen_random_uuid(), %s, %s, 'm', '{}'::jsonb, %s, %s) RETURNING id",
                (owner, context_id, status, created),
            )
        ).fetchone()
        assert row is not None
        return uuid.UUID(str(row[0]))

    old, recent = "2020-03-01T00:00:00+00:00", "2020-09-01T00:00:00+00:00"
    ended_context = await context(tenant, old)
    ended = [await result(tenant, ended_context, s, old) for s in ("completed", "failed", "cancelled")]
    pending_context = await context(tenant, old)
    pending = await result(tenant, pending_context, "pending", old)
    await result(tenant, pending_context, "completed", old)  # its context stays: a pending job uses it
    never_sent = await context(tenant, old)
    late = await result(tenant, await context(tenant, recent), "completed", recent)
    theirs = await result(other, await context(other, old), "completed", old)

    cut = "2020-06-01T00:00:00+00:00"
    counted = _cli(api_db_url, "purge", "--before", cut, "--tenant", tenant, "--dry-run", group="results")
    assert counted.returncode == 0, counted.stderr
    # What the run deletes: the contexts its ended results leave unused included.
    assert f"would delete 4 results and 2 contexts (tenant {tenant}'s" in counted.stdout
    done = _cli(api_db_url, "purge", "--before", cut, "--tenant", tenant, group="results")
    assert done.returncode == 0, done.stderr
    assert (
        f"deleted 4 results and 2 contexts (tenant {tenant}'s" in done.stdout
    )  # its ended results freed one more

    async def exists(table: str, row_id: uuid.UUID) -> bool:
        return (
            await (await db.execute(f"SELECT 1 FROM {table} WHERE id = %s", (row_id,))).fetchone()
        ) is not None

    assert not any([await exists("result", r) for r in ended])
    assert not await exists("context", ended_context) and not await exists("context", never_sent)
    assert await exists("result", pending) and await exists("context", pending_context)
    assert await exists("result", late) and await exists("result", theirs)

    naive = _cli(api_db_url, "purge", "--before", "2020-06-01T00:00:00", group="results")
    assert naive.returncode == 1 and naive.stderr.startswith(
        "error: --before: '2020-06-01T00:00:00' has no zone"
    )
    assert len(naive.stderr.splitlines()) == 1, naive.stderr


async def test_purge_takes_fractional_seconds_and_a_date_alone_as_its_midnight_utc(
    api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    tenant = f"dates-{uuid.uuid4().hex[:8]}"
    cases = [
        ("2026-12-09T00:00:00.5+00:00", "2026-12-09T00:00:00.500000+00:00"),
        ("2026-12-09T00:00:00.123456Z", "2026-12-09T00:00:00.123456+00:00"),
        ("2026-12-09", "2026-12-09T00:00:00+00:00"),
        ("2026-12-09 01:00:00+01:00", "2026-12-09T01:00:00+01:00"),
    ]
    for given, shown in cases:
        done = _cli(api_db_url, "purge", "--before", given, "--tenant", tenant, "--dry-run", group="results")
        assert done.returncode == 0, (given, done.stderr)
        assert f"created before {shown})" in done.stdout, (given, done.stdout)
    for given in ("2026-13-01", "yesterday", "2026-12-09T25:00:00Z"):
        refused = _cli(api_db_url, "purge", "--before", given, group="results")
        assert refused.returncode == 1 and refused.stderr.startswith("error: --before: "), refused.stderr
        assert "is neither a date nor a time" in refused.stderr and len(refused.stderr.splitlines()) == 1
    helped = _cli(api_db_url, "purge", "--help", group="results")
    assert "midnight UTC" in helped.stdout


async def test_keys_list_shows_each_keys_own_limits_and_create_prints_json(
    api_db_url: str, db: psycopg.AsyncConnection[Any]
) -> None:
    made = _cli(api_db_url, "create", "--tenant", "acme", "--name", "script", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert set(created) == {"id", "key", "tenant", "name", "scope"}
    assert created["key"].startswith("llmq_") and (created["tenant"], created["name"], created["scope"]) == (
        "acme",
        "script",
        "user",
    )
    limited = _cli(
        api_db_url,
        "create",
        "--tenant",
        "acme",
        "--name",
        "capped",
        "--max-pending",
        "7",
        "--submit-rate-per-s",
        "3",
        "--json",
    )
    capped = json.loads(limited.stdout)["id"]
    listed = _cli(api_db_url, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "id",
        "prefix",
        "tenant",
        "scope",
        "max_pending",
        "submit_rate_per_s",
        "state",
        "name",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[capped][4:] == ["7", "3", "active", "capped"]
    assert rows[created["id"]][4:] == ["active", "script"]  # none of its own: blank


async def test_an_unmigrated_database_says_to_run_the_migrations(api_db_url: str) -> None:
    empty = f"llmq_cli_empty_{uuid.uuid4().hex[:8]}"
    base, _, _ = api_db_url.rpartition("/")
    admin = await psycopg.AsyncConnection.connect(
        f"{base}/postgres".replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )
    try:
        await admin.execute(f'CREATE DATABASE "{empty}"')
        for args, group in ((("list",), "keys"), (("show", "acme"), "tenants")):
            done = _cli(f"{base}/{empty}", *args, group=group)
            assert done.returncode == 1, done.stdout
            assert done.stderr.startswith("error: the database has no schema, or an older one"), done.stderr
            assert "run `alembic upgrade head`" in done.stderr and len(done.stderr.splitlines()) == 1
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{empty}"')
        await admin.close()
