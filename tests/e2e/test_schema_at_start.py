"""The API and the worker at start against a database whose migration is not the code's: real
`uvicorn` and `celery` processes, as an operator starts them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from devstack.database import create_database_if_missing, drop_database, migrate
from devstack.processes import free_port
from sqlalchemy import create_engine, text

from app.config import Settings
from app.routes.health import SCHEMA_REVISION
from tests.conftest import PG_BASE, ROOT

BIN = Path(sys.executable).parent
NEWER = f"{int(SCHEMA_REVISION) + 1:04d}"


@pytest.fixture
def database() -> Iterator[str]:
    url = f"{PG_BASE}/llmq_schemastart_{uuid.uuid4().hex[:12]}"
    create_database_if_missing(url)
    migrate(url)
    yield url
    drop_database(url)


def _set_revision(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


def _env(database_url: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    return {
        **inherited,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DATABASE_URL": database_url,
        "REDIS_URL": os.environ["REDIS_URL"],
        "CELERY_QUEUE": f"llmq-schemastart-{uuid.uuid4().hex[:8]}",
        "TRITON_URL": f"http://127.0.0.1:{free_port()}",
        "TRITON_GRPC_URL": f"127.0.0.1:{free_port()}",
    }


def _api(port: int) -> list[str]:
    return [str(BIN / "uvicorn"), "app.asgi:app", "--port", str(port)]


WORKER = [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--loglevel", "INFO", "-P", "solo"]


def _started(argv: list[str], env: dict[str, str], marker: str) -> str:
    """Starts the process, waits for `marker` in its output, stops it; its output."""
    log = Path(f"/tmp/llmq-schemastart-{uuid.uuid4().hex}.log")
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while marker not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        return log.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.unlink()


@pytest.mark.parametrize("entry", ["api", "worker"])
def test_an_older_schema_stops_the_start_in_one_line(database: str, entry: str) -> None:
    command.downgrade(_config(database), "0004")
    argv = _api(free_port()) if entry == "api" else WORKER
    started = subprocess.run(argv, cwd=ROOT, env=_env(database), capture_output=True, text=True, timeout=60)
    assert started.returncode != 0
    output = started.stdout + started.stderr
    assert "Traceback" not in output and "UndefinedColumn" not in output, output
    [line] = [line for line in output.splitlines() if "0004" in line]
    assert line.endswith(
        f"the database is at migration 0004, older than this code ({SCHEMA_REVISION}): run alembic upgrade head"
    ), output
    assert "password" not in output and "postgres:postgres" not in output


def test_a_newer_schema_starts_with_a_warning_and_is_ready_with_a_note(database: str) -> None:
    """A rolling deploy: the previous release's code on a migrated database (migrations are additive)."""
    _set_revision(database, NEWER)
    note = (
        f"the database is at migration {NEWER}, newer than this code ({SCHEMA_REVISION}); it runs on it "
        f"(migrations are additive): deploy the code of migration {NEWER}"
    )
    port = free_port()
    output = _started(_api(port), _env(database), "Application startup complete.")
    assert note in output and "Traceback" not in output, output
    output = _started(WORKER, _env(database), "ready.")
    assert note in output and "Traceback" not in output, output


def test_an_unreachable_database_does_not_stop_the_start() -> None:
    """Readiness reports it and the pools reconnect: the process must be up when Postgres comes back."""
    env = _env(f"postgresql+psycopg://postgres:postgres@127.0.0.1:{free_port()}/llmq")
    port = free_port()
    output = _started(_api(port), env, "Application startup complete.")
    assert "could not read the database's migration at start" in output, output
    output = _started(WORKER, env, "ready.")
    assert "could not read the database's migration at start" in output, output


def _config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    return config
