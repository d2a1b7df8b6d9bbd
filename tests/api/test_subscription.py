"""The process's long-lived pub/sub subscription through a Redis outage, against a Redis of its own."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time

import pytest
from devstack.processes import free_port

from app.subscription import subscribe_forever

pytestmark = pytest.mark.anyio


def _redis(port: int) -> subprocess.Popen[bytes]:
    """A redis-server of its own, answering by the time this returns."""
    server = shutil.which("redis-server")
    assert server is not None
    argv = [server, "--port", str(port), "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


async def _until(event: asyncio.Event, timeout_s: float) -> None:
    await asyncio.wait_for(event.wait(), timeout_s)


async def test_an_outage_is_one_line_each_way_not_a_traceback_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    redis = _redis(port)
    subscribed, lost = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        subscribe_forever(f"redis://127.0.0.1:{port}/0", "test", "test notices", subscribed, print, lost.set)
    )
    try:
        await _until(subscribed, 10)
        caplog.set_level(logging.INFO, logger="app.subscription")
        redis.kill()  # no graceful shutdown, during which it may still take a connection
        redis.wait(10)
        await _until(lost, 10)
        await asyncio.sleep(3.5)  # three more failed attempts
        assert not subscribed.is_set()
        redis = _redis(port)
        await _until(subscribed, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        redis.terminate()
        redis.wait(10)
    records = [r for r in caplog.records if r.name == "app.subscription"]
    assert [r.levelname for r in records] == ["WARNING", "INFO"], [r.getMessage() for r in records]
    assert records[0].getMessage().startswith("test notices: subscription lost (")
    assert records[1].getMessage() == "test notices: subscribed again"
    assert all(r.exc_info is None for r in records)
