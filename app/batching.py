"""Concurrent requests gathered into one call (one statement for a burst of submits, say).

One batch runs at a time; whatever arrives meanwhile forms the next one. Nothing waits for a batch
to fill: a lone request runs at once, and a burst costs a few calls instead of one per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R | Exception]]],
        *,
        max_batch: int = 256,
        shared_failure: Callable[[Exception], bool] = lambda exc: False,
    ) -> None:
        """`run(items)` answers every item, in order: its result, or an exception for its caller
        alone; if `run` raises, every caller of the batch gets that exception, and if
        `shared_failure(exc)` says so (a service found down), so do the callers queued meanwhile:
        they would meet it too, and should not wait for a batch of their own to find out."""
        self._run = run
        self._max = max_batch
        self._shared_failure = shared_failure
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                taken, self._queue = self._queue[: self._max], self._queue[self._max :]
                batch = [(item, future) for item, future in taken if not future.done()]  # callers gone
                if not batch:
                    continue
                items = [item for item, _ in batch]
                try:
                    answers = await self._run(items)
                    if len(answers) != len(items):
                        raise RuntimeError(f"a batch of {len(items)} got {len(answers)} answers")
                except Exception as exc:
                    if self._shared_failure(exc):
                        batch, self._queue = batch + self._queue, []
                    answers = [exc] * len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if future.done():
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
                batch = []
        finally:
            self._task = None
            for _, future in [*batch, *self._queue]:  # only when this task is cancelled (the app stops)
                future.cancel()
            self._queue = []
