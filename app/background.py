"""Background work of the API process: refreshes of what a request may use a little stale (keys,
pending counts, last use), and stopping the long-lived tasks (subscriptions, the doorbell)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Hashable
from typing import Any

log = logging.getLogger(__name__)


class Refreshes:
    """At most one task per key at a time; a failure is logged, never raised (the stale value stays,
    the next request starts another)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._running: dict[Hashable, asyncio.Task[None]] = {}

    def start(self, key: Hashable, work: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        if key not in self._running:
            self._running[key] = asyncio.create_task(self._quietly(key, work))

    async def _quietly(self, key: Hashable, work: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        try:
            await work()
        except Exception as exc:
            log.warning("%s (%s) failed: %s", self._what, key, exc)
        finally:
            self._running.pop(key, None)


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel a long-lived task and wait for it to end (whatever it raised on the way)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
