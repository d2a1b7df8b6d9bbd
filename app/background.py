"""Background work of the API process: refreshes of what a request may use a little stale (keys,
pending counts, last use), and stopping the long-lived tasks (subscriptions, the doorbell)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Refreshes:
    """At most one task per key at a time; a failure is logged, never raised (the stale value stays,
    the next request starts another)."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._running: dict[Hashable, asyncio.Task[None]] = {}

    def start(
        self, key: Hashable, work: Callable[[], Coroutine[Any, Any, Any]], label: str | None = None
    ) -> None:
        """`label` names the work in a log line instead of `key` (which may be a secret's hash)."""
        if key not in self._running:
            self._running[key] = asyncio.create_task(self._quietly(key, work, label or str(key)))

    async def _quietly(self, key: Hashable, work: Callable[[], Coroutine[Any, Any, Any]], label: str) -> None:
        try:
            await work()
        except Exception as exc:
            log.warning("%s (%s) failed: %s", self._what, label, exc)
        finally:
            self._running.pop(key, None)


async def stop(task: asyncio.Task[Any] | None, timeout_s: float = 5.0) -> None:
    """Cancel a long-lived task and wait for it to end (whatever it raised on the way), but never
    hang a shutdown on it: a client library that swallows a cancel would keep it running."""
    if task is None or task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("background task %s did not stop within %.0f s; left behind", task.get_name(), timeout_s)
        return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


def cancelling() -> bool:
    """Whether the running task has been asked to stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def detached(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task that runs to its end even when whoever awaits it (through `asyncio.shield`) is
    cancelled; its error, when nobody is left to await it, is not reported as never retrieved."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    return task


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
