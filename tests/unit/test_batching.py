"""app.batching.Batcher: concurrent requests gathered into one call, each caller its own answer."""

from __future__ import annotations

import asyncio

import pytest

from app.batching import Batcher

pytestmark = pytest.mark.anyio


class Recorder:
    """A batch call that records each batch and holds it until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def run(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        await self.release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def first_batch_held(rec: Recorder) -> tuple[Batcher[int, int], asyncio.Future[int]]:
    """A batcher whose first batch (item 0) is running, held by `rec` until released."""
    rec.release.clear()
    batcher = Batcher(rec.run)
    first = asyncio.ensure_future(batcher(0))
    await asyncio.sleep(0.01)
    return batcher, first


async def test_a_lone_request_runs_at_once_as_a_batch_of_one() -> None:
    rec = Recorder()
    batcher = Batcher(rec.run)
    assert await asyncio.wait_for(batcher(2), 1) == 20
    assert rec.batches == [[2]]


async def test_requests_arriving_while_a_batch_runs_form_the_next_batch() -> None:
    rec = Recorder()
    batcher, first = await first_batch_held(rec)
    rest = [asyncio.ensure_future(batcher(i)) for i in (2, 4, 6)]
    await asyncio.sleep(0.01)
    assert rec.batches == [[0]]
    rec.release.set()
    assert await first == 0
    assert [await f for f in rest] == [20, 40, 60]
    assert rec.batches == [[0], [2, 4, 6]]


async def test_an_item_answered_with_an_exception_fails_only_its_caller() -> None:
    batcher = Batcher(Recorder().run)
    answers = await asyncio.gather(*(batcher(i) for i in range(4)), return_exceptions=True)
    assert answers[0] == 0 and answers[2] == 20
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "odd 1"
    assert isinstance(answers[3], ValueError) and str(answers[3]) == "odd 3"


async def test_a_failed_batch_call_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int | Exception]:
        calls.append(items)
        if len(calls) == 1:
            raise ConnectionError("database unreachable")
        return list(items)

    batcher = Batcher(run)
    answers = await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)
    assert all(isinstance(a, ConnectionError) for a in answers)
    assert await batcher(3) == 3


async def test_batches_are_cut_at_max_batch() -> None:
    rec = Recorder()
    batcher = Batcher(rec.run, max_batch=3)
    await asyncio.gather(*(batcher(i * 2) for i in range(7)))
    assert [len(b) for b in rec.batches] == [3, 3, 1]


async def test_a_caller_that_went_away_before_its_batch_ran_is_left_out() -> None:
    rec = Recorder()
    batcher, first = await first_batch_held(rec)
    gone = asyncio.ensure_future(batcher(2))
    kept = asyncio.ensure_future(batcher(4))
    await asyncio.sleep(0.01)
    gone.cancel()
    rec.release.set()
    assert await first == 0 and await kept == 40
    assert rec.batches == [[0], [4]]


async def test_callers_waiting_when_the_batcher_is_cancelled_are_cancelled_not_left_hanging() -> None:
    rec = Recorder()
    batcher, running = await first_batch_held(rec)
    queued = asyncio.ensure_future(batcher(2))
    await asyncio.sleep(0)
    assert batcher._task is not None
    batcher._task.cancel()
    for caller in (running, queued):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 1)


async def test_a_shared_failure_also_fails_the_callers_queued_meanwhile_at_once() -> None:
    """A service found down: the callers that arrived during the failing call get its error with
    it, instead of each batch after it waiting to find the same."""
    calls: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int | Exception]:
        calls.append(items)
        await release.wait()
        raise ConnectionError("down")

    batcher = Batcher(run, shared_failure=lambda exc: isinstance(exc, ConnectionError))
    first = asyncio.ensure_future(batcher(0))
    await asyncio.sleep(0.01)
    queued = [asyncio.ensure_future(batcher(i)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    release.set()
    answers = await asyncio.gather(first, *queued, return_exceptions=True)
    assert all(isinstance(a, ConnectionError) for a in answers)
    assert calls == [[0]]
