"""Triton's HTTP admin endpoints: readiness and the model repository index."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)


class TritonUnavailable(Exception):
    """Triton could not be reached or answered with an error."""


@dataclass(frozen=True)
class ModelState:
    name: str
    version: str | None
    state: str | None
    reason: str | None

    @property
    def ready(self) -> bool:
        return self.state == "READY"


class TritonAdmin:
    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = httpx.Timeout(timeout_s)
        self._client: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None

    def _http(self) -> httpx.AsyncClient:
        # One client (connection pool) per event loop: building one costs more than the request.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            self._client = (loop, httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout))
        return self._client[1]

    async def close(self) -> None:
        if self._client is not None:
            await self._client[1].aclose()
            self._client = None

    async def _request(self, method: str, path: str, json: object | None = None) -> httpx.Response:
        try:
            return await self._http().request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise TritonUnavailable(
                f"Triton at {self.base_url} is unreachable: {exc or type(exc).__name__}"
            ) from exc

    async def server_ready(self) -> bool:
        response = await self._request("GET", "/v2/health/ready")
        return response.status_code == 200

    async def list_models(self) -> list[ModelState]:
        """Every model in the repository with its state (READY, UNAVAILABLE, LOADING, or none if never loaded)."""
        response = await self._request("POST", "/v2/repository/index", json={})
        if response.status_code != 200:
            raise TritonUnavailable(
                f"Triton at {self.base_url} answered {response.status_code} to the repository index: "
                f"{response.text[:200]}"
            )
        models: dict[str, ModelState] = {}
        for entry in response.json():
            state = ModelState(
                name=str(entry["name"]),
                version=str(entry["version"]) if entry.get("version") else None,
                state=entry.get("state"),
                reason=entry.get("reason") or None,
            )
            # Several versions of one model: report the ready one if any.
            if state.name not in models or state.ready:
                models[state.name] = state
        return sorted(models.values(), key=lambda m: m.name)


class ModelCatalog:
    """Triton's model list, cached briefly so that validating every submit costs no round trip.

    Within `ttl_s` of the last fetch the list is used as is. For another `ttl_s` after that it is
    still used while one background task fetches a new one, so no submit waits for Triton. Older
    than 2 x `ttl_s` (e.g. Triton has stopped answering), or with `refresh=True`, the caller waits
    for a fetch and sees its error."""

    def __init__(self, admin: TritonAdmin, ttl_s: float) -> None:
        self.admin = admin
        self.ttl_s = ttl_s
        self._models: dict[str, ModelState] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def get(self, *, refresh: bool = False) -> dict[str, ModelState]:
        age = time.monotonic() - self._fetched_at
        if not refresh and age <= self.ttl_s:
            return self._models
        if not refresh and age <= 2 * self.ttl_s:
            if self._background is None or self._background.done():
                self._background = asyncio.create_task(self._refresh_quietly())
            return self._models
        async with self._lock:
            if refresh or time.monotonic() - self._fetched_at > self.ttl_s:
                await self._fetch()
            return self._models

    async def _fetch(self) -> None:
        self._models = {m.name: m for m in await self.admin.list_models()}
        self._fetched_at = time.monotonic()

    async def _refresh_quietly(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched_at <= self.ttl_s:
                return  # someone else fetched meanwhile
            try:
                await self._fetch()
            except Exception as exc:  # nobody awaits this task: log, never raise
                # The list keeps aging: past 2 x ttl callers fetch themselves and get the error.
                log.warning("model list refresh failed: %s", exc)

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
            self._background = None
