"""The process's long-lived pub/sub subscription through a Redis outage, against a Redis of its own."""

from __future__ import annotations

import asyncio
import logging

import pytest
from devstack.processes import free_port

from app.subscription import subscribe_forever
from tests.conftest import start_redis_server

pytestmark = pytest.mark.anyio


async def _until(event: asyncio.Event, timeout_s: float) -> None:
    await asyncio.wait_for(event.wait(), timeout_s)


async def test_an_outage_is_one_line_each_way_not_a_traceback_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    redis = start_redis_server(port)
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
        redis = start_redis_server(port)
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
