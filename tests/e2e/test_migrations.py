"""The Alembic migrations against a real Postgres: each test on scratch databases of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from devstack.database import create_database_if_missing, drop_database, migrate
from sqlalchemy import create_engine, inspect, text

from tests.conftest import PG_BASE, ROOT


@pytest.fixture
def scratch_db() -> Iterator[Callable[[], str]]:
    """Makes empty databases named llmq_fixmig_*, dropped when the test ends."""
    made: list[str] = []

    def make() -> str:
        url = f"{PG_BASE}/llmq_fixmig_{uuid.uuid4().hex[:12]}"
        made.append(url)
        create_database_if_missing(url)
        return url

    yield make
    for url in made:
        drop_database(url)


def _alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    return config


def _query(url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def test_downgrade_below_cancelled_turns_cancelled_jobs_into_failed(scratch_db: Callable[[], str]) -> None:
    url = scratch_db()
    migrate(url)
    context_id = uuid.uuid4()
    _query(
        url,
        "INSERT INTO context (id, content, tenant) VALUES (:id, 'hello', 'default')",
        id=context_id,
    )
    without_error, with_error = uuid.uuid4(), uuid.uuid4()
    for result_id, error in ((without_error, None), (with_error, "cancelled by the client")):
        _query(
            url,
            "INSERT INTO result (id, context_id, model, status, error, tenant) "
            "VALUES (:id, :context_id, 'm', 'cancelled', :error, 'default')",
            id=result_id,
            context_id=context_id,
            error=error,
        )

    command.downgrade(_alembic_config(url), "0003")

    rows = dict(
        (row_id, (status, error))
        for row_id, status, error in _query(url, "SELECT id, status, error FROM result")
    )
    assert rows == {
        without_error: ("failed", "cancelled (downgraded)"),
        with_error: ("failed", "cancelled by the client"),
    }
    assert _query(url, "SELECT version_num FROM alembic_version") == [("0003",)]


def test_x_url_wins_over_database_url(scratch_db: Callable[[], str]) -> None:
    from_env, explicit = scratch_db(), scratch_db()
    env = {**os.environ, "APP_ENV_FILE": "/dev/null", "DATABASE_URL": from_env}
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={explicit}", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )

    heads = [row[0] for row in _query(explicit, "SELECT version_num FROM alembic_version")]
    assert heads == [ScriptDirectory.from_config(_alembic_config(explicit)).get_current_head()]
    engine = create_engine(from_env)
    try:
        assert inspect(engine).get_table_names() == []  # the DATABASE_URL one is untouched
    finally:
        engine.dispose()
