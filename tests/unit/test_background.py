"""Stopping the API's long-lived tasks never hangs a shutdown; a failed refresh says what failed
without naming its key."""

from __future__ import annotations

import asyncio
import logging

import pytest

from app import background

pytestmark = pytest.mark.anyio


async def test_a_task_that_swallows_its_cancel_is_left_behind_not_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:  # as a client library that turns a cancel into an error
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="app.background"):
        await asyncio.wait_for(background.stop(task, timeout_s=0.2), 5)
    assert "stubborn did not stop" in caplog.text and not task.done()
    release.set()  # the test's own cleanup
    await task


async def test_a_listener_that_turns_its_cancel_into_an_error_stops() -> None:
    async def listener() -> None:
        while True:
            try:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    raise ConnectionError("connection closed") from None  # what a client may raise
            except Exception:
                if background.cancelling():
                    raise asyncio.CancelledError from None
                await asyncio.sleep(0.01)

    task = asyncio.create_task(listener())
    await asyncio.sleep(0)
    await asyncio.wait_for(background.stop(task, timeout_s=2), 5)
    assert task.cancelled()


async def test_a_failed_refresh_is_logged_by_its_label_not_its_key(caplog: pytest.LogCaptureFixture) -> None:
    digest = bytes.fromhex("9f" * 32)  # as the key ring's cache key: a key's SHA-256

    async def down() -> None:
        raise OSError("Postgres unreachable")

    refreshes = background.Refreshes("API key refresh")
    with caplog.at_level(logging.WARNING, logger="app.background"):
        refreshes.start(digest, down, "key 42")
        refreshes.start(digest, down, "key 42")  # one at a time per key
        for _ in range(10):
            await asyncio.sleep(0)
    assert [r.getMessage() for r in caplog.records] == [
        "API key refresh (key 42) failed: Postgres unreachable"
    ]
    assert "9f9f" not in caplog.text and "\\x9f" not in caplog.text
