"""The process's long-lived pub/sub subscription through a Redis outage, against a Redis of its own."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from app.subscription import subscribe_forever
from bench.faults.services import OwnRedis

pytestmark = pytest.mark.anyio


async def _until(event: asyncio.Event, timeout_s: float) -> None:
    await asyncio.wait_for(event.wait(), timeout_s)


async def test_an_outage_is_one_line_each_way_not_a_traceback_a_second(
    caplog: pytest.LogCaptureFixture, logs_dir: Path
) -> None:
    redis = OwnRedis(logs_dir / "subscription-outage")
    redis.start()
    subscribed, lost = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        subscribe_forever(redis.url, "test", "test notices", subscribed, print, lost.set)
    )
    try:
        await _until(subscribed, 10)
        caplog.set_level(logging.INFO, logger="app.subscription")
        redis.kill9()  # no graceful shutdown, during which it may still take a connection
        await _until(lost, 10)
        await asyncio.sleep(3.5)  # three more failed attempts
        assert not subscribed.is_set()
        redis.start()  # the same port
        await _until(subscribed, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        redis.stop()
    records = [r for r in caplog.records if r.name == "app.subscription"]
    assert [r.levelname for r in records] == ["WARNING", "INFO"], [r.getMessage() for r in records]
    assert records[0].getMessage().startswith("test notices: subscription lost (")
    assert records[1].getMessage() == "test notices: subscribed again"
    assert all(r.exc_info is None for r in records)
