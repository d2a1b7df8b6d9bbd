"""The API's cached model list: refreshed in the background, never a wait on the submit path
while it is fresh enough, and Triton's errors surface once it is too old."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from devstack.processes import free_port

from app.triton.admin import ModelCatalog, ModelState, TritonAdmin, TritonUnavailable
from tests.conftest import FAST_MODEL

pytestmark = pytest.mark.anyio

TTL_S = 0.3


class GatedAdmin(TritonAdmin):
    """The real admin client against the real Triton, whose fetches can be held at a gate."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url, timeout_s=2)
        self.gate = asyncio.Event()
        self.gate.set()
        self.fetches = 0

    async def list_models(self) -> list[ModelState]:
        self.fetches += 1
        await self.gate.wait()
        return await super().list_models()


@pytest.fixture
async def admin(triton: object) -> GatedAdmin:
    admin = GatedAdmin(triton.http_url)  # type: ignore[attr-defined]
    yield admin  # type: ignore[misc]
    admin.gate.set()
    await admin.close()


async def test_a_stale_list_is_served_at_once_while_one_refresh_runs(admin: GatedAdmin) -> None:
    catalog = ModelCatalog(admin, TTL_S)
    try:
        first = await catalog.get()
        assert first[FAST_MODEL].ready and admin.fetches == 1
        await asyncio.sleep(TTL_S * 1.2)  # stale, but within 2 x ttl
        admin.gate.clear()  # Triton "slow": the refresh cannot finish
        started = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*(catalog.get() for _ in range(20))), 1)
        assert time.monotonic() - started < 0.05  # nobody waited for the held fetch
        assert all(a is first for a in answers)  # the cached list
        await asyncio.sleep(0)
        assert admin.fetches == 2  # one background refresh, not one per caller
        admin.gate.set()
        for _ in range(100):
            if catalog._background is not None and catalog._background.done():
                break
            await asyncio.sleep(0.01)
        fresh = await catalog.get()
        assert fresh is not first and fresh[FAST_MODEL].ready  # the refreshed list
        assert admin.fetches == 2
    finally:
        await catalog.close()


async def test_a_list_older_than_twice_the_ttl_waits_for_triton(admin: GatedAdmin) -> None:
    catalog = ModelCatalog(admin, TTL_S)
    try:
        await catalog.get()
        await asyncio.sleep(TTL_S * 2.2)
        admin.gate.clear()
        waiting = asyncio.create_task(catalog.get())
        await asyncio.sleep(0.1)
        assert not waiting.done()  # too old to be trusted: it waits for the fetch
        admin.gate.set()
        assert (await asyncio.wait_for(waiting, 5))[FAST_MODEL].ready
        assert admin.fetches == 2
    finally:
        await catalog.close()


async def test_refresh_forces_a_fetch_even_when_fresh(admin: GatedAdmin) -> None:
    catalog = ModelCatalog(admin, 60)
    await catalog.get()
    await catalog.get(refresh=True)
    await catalog.get()
    assert admin.fetches == 2


async def test_triton_gone_is_logged_in_the_background_then_raised_to_callers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The refresh fails against a port where nothing listens: callers within the stale window still
    get the old list; once it is older than 2 x ttl, they get Triton's error (the API answers 503)."""
    admin = TritonAdmin(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    catalog = ModelCatalog(admin, TTL_S)
    known = {FAST_MODEL: ModelState(FAST_MODEL, "1", "READY", None)}
    catalog._models, catalog._fetched_at = known, time.monotonic()
    try:
        await asyncio.sleep(TTL_S * 1.2)
        with caplog.at_level(logging.WARNING, logger="app.triton.admin"):
            assert await catalog.get() is known
            assert catalog._background is not None
            await catalog._background  # failed quietly
        assert "model list refresh failed" in caplog.text and "unreachable" in caplog.text
        await asyncio.sleep(TTL_S)
        with pytest.raises(TritonUnavailable, match="unreachable"):
            await catalog.get()
    finally:
        await catalog.close()
        await admin.close()
