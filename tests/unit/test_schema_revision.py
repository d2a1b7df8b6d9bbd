"""The migration readiness expects is the last one written."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory

from app.routes.health import SCHEMA_REVISION
from tests.conftest import ROOT


def test_readiness_expects_the_migrations_head() -> None:
    head = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_current_head()
    assert head == SCHEMA_REVISION
