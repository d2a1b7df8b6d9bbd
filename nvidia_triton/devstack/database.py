"""Create, recreate and migrate databases: shared by `make dev`, the tests and the benchmark."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import DBAPIError

ROOT = Path(__file__).resolve().parents[2]


def _admin_run(url: str, *statements: str) -> list[object]:
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            results = [conn.execute(text(s), {"n": make_url(url).database}) for s in statements]
            return [r.first() if r.returns_rows else None for r in results]
    finally:
        admin.dispose()


def create_database_if_missing(url: str) -> bool:
    """True when it had to be created."""
    name = make_url(url).database
    (exists,) = _admin_run(url, "SELECT 1 FROM pg_database WHERE datname = :n")
    if exists:
        return False
    _admin_run(url, f'CREATE DATABASE "{name}"')
    return True


def setup_problem(exc: DBAPIError, url: str) -> str:
    """One line for an operator: what Postgres said, with the user and database (never the password)."""
    parts = make_url(url)
    said = " ".join(str(exc.orig).split()) or type(exc.orig).__name__
    return (
        f"cannot check or create the database {parts.database!r} as user {parts.username!r} on "
        f"{parts.host or 'localhost'}:{parts.port or 5432}: {said} (check DATABASE_URL)"
    )


def drop_database(url: str) -> None:
    _admin_run(url, f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


def migrate(url: str) -> None:
    """`alembic upgrade head` on that database, as a deployment does."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")


def recreate_database(url: str) -> str:
    drop_database(url)
    create_database_if_missing(url)
    migrate(url)
    return url
