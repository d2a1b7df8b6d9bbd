"""`make dev` starts a local Redis that is installed but not running (on a spare port here, so
the machine's own Redis is left alone)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import redis
from devstack.__main__ import ensure_services, reachable
from devstack.processes import free_port

from app.config import Settings


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_stopped_local_redis_is_started(api_db_url: str) -> None:
    port = free_port()
    assert not reachable("127.0.0.1", port)
    settings = Settings(DATABASE_URL=api_db_url, REDIS_URL=f"redis://127.0.0.1:{port}/0")
    try:
        ensure_services(settings)
        assert redis.Redis(port=port).ping()
    finally:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False, capture_output=True)
