"""While Triton is unreachable the API still accepts jobs for models it saw ready within
MODEL_READY_WINDOW_S (they wait for Triton), refuses the others with 503, and asks Triton at most
once a second meanwhile (no submit waits for it each time)."""

from __future__ import annotations

import time

import pytest
from devstack.processes import free_port

from app.errors import ServiceUnavailable
from app.routes.models import check_ready
from app.triton.admin import ModelCatalog, TritonAdmin
from tests.conftest import FAST_MODEL, UNLOADED_MODEL

pytestmark = pytest.mark.anyio


class CountingAdmin(TritonAdmin):
    def __init__(self, base_url: str) -> None:
        super().__init__(base_url, timeout_s=2)
        self.fetches = 0

    async def list_models(self):  # type: ignore[no-untyped-def]
        self.fetches += 1
        return await super().list_models()


async def test_models_seen_ready_are_accepted_while_triton_is_down(triton: object) -> None:
    live = TritonAdmin(triton.http_url, timeout_s=2)  # type: ignore[attr-defined]
    down = CountingAdmin(f"http://127.0.0.1:{free_port()}")
    catalog = ModelCatalog(live, ttl_s=0, ready_window_s=0.5)
    try:
        await check_ready(catalog, FAST_MODEL)  # seen ready
        catalog.admin = down  # Triton goes away
        await check_ready(catalog, FAST_MODEL)  # accepted: seen ready a moment ago
        assert down.fetches == 1
        started = time.monotonic()
        for _ in range(20):
            await check_ready(catalog, FAST_MODEL)
        assert down.fetches == 1 and time.monotonic() - started < 0.5  # the failure is remembered
        with pytest.raises(ServiceUnavailable, match="unreachable"):
            await check_ready(catalog, UNLOADED_MODEL)  # never seen ready: refused
        time.sleep(0.6)  # past the window
        with pytest.raises(ServiceUnavailable, match="unreachable"):
            await check_ready(catalog, FAST_MODEL)
    finally:
        await catalog.close()
        await live.close()
        await down.close()


async def test_without_a_window_triton_down_is_a_503(triton: object) -> None:
    live = TritonAdmin(triton.http_url, timeout_s=2)  # type: ignore[attr-defined]
    catalog = ModelCatalog(live, ttl_s=0)
    try:
        await check_ready(catalog, FAST_MODEL)
        catalog.admin = TritonAdmin(f"http://127.0.0.1:{free_port()}", timeout_s=2)
        with pytest.raises(ServiceUnavailable, match="cannot check model"):
            await check_ready(catalog, FAST_MODEL)
    finally:
        await catalog.close()
        await live.close()
