"""Triton's HTTP admin endpoints: readiness and the model repository index."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from app import background

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
        # One client per event loop: building one costs more than the request. No idle keep-alive
        # connection: Triton stopping waits for open HTTP connections, then aborts (its exit timeout).
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            limits = httpx.Limits(max_keepalive_connections=0)
            self._client = (
                loop,
                httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout, limits=limits),
            )
        return self._client[1]

    async def close(self) -> None:
        if self._client is not None:
            await self._client[1].aclose()
            self._client = None

    async def _request(self, method: str, path: str, json: object | None = None) -> httpx.Response:
        try:
            return await self._http().request(method, path, json=json)
        except httpx.HTTPError as exc:
            # A timeout's message is empty: its type says what happened.
            reason = str(exc) or type(exc).__name__
            raise TritonUnavailable(f"Triton at {self.base_url} is unreachable: {reason}") from exc

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


FAILURE_TTL_S = 1.0


class ModelCatalog:
    """Triton's model list, cached briefly so that validating every submit costs no round trip.

    Within `ttl_s` of the last fetch the list is used as is. For another `ttl_s` after that it is
    still used while one background task fetches a new one, so no submit waits for Triton. Older
    than 2 x `ttl_s` (e.g. Triton has stopped answering), or with `refresh=True`, the caller waits
    for a fetch and sees its error; after a failed fetch callers get its error at once while one
    background fetch a second asks Triton again. `seen_ready_recently`: a model ready in a list of the last `ready_window_s`."""

    def __init__(self, admin: TritonAdmin, ttl_s: float, ready_window_s: float = 0.0) -> None:
        self.admin = admin
        self.ttl_s = ttl_s
        self.ready_window_s = ready_window_s
        self._models: dict[str, ModelState] = {}
        self._fetched_at = float("-inf")
        self._ready_seen: dict[str, float] = {}
        self._failure: tuple[float, TritonUnavailable] | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    def seen_ready_recently(self, name: str) -> bool:
        """Whether `name` was ready in a list fetched within the last `ready_window_s` seconds."""
        return time.monotonic() - self._ready_seen.get(name, float("-inf")) <= self.ready_window_s

    async def get(self, *, refresh: bool = False) -> dict[str, ModelState]:
        age = time.monotonic() - self._fetched_at
        if not refresh and age <= self.ttl_s:
            return self._models
        if not refresh and age <= 2 * self.ttl_s:
            self._refresh_in_background()
            return self._models
        self._raise_failure()
        async with self._lock:
            self._raise_failure()  # the fetch the lock waited for failed: no second wait
            if refresh or time.monotonic() - self._fetched_at > self.ttl_s:
                await self._fetch()
            return self._models

    def _refresh_in_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._refresh_quietly())

    def _raise_failure(self) -> None:
        # The last fetch failed: no caller waits for Triton again (an unreachable host could hold each
        # for the whole connect timeout); one background fetch a second asks it again.
        if self._failure is not None:
            if time.monotonic() - self._failure[0] >= FAILURE_TTL_S:
                self._refresh_in_background()
            raise self._failure[1]

    async def _fetch(self) -> None:
        try:
            models = {m.name: m for m in await self.admin.list_models()}
        except TritonUnavailable as exc:
            self._failure = (time.monotonic(), exc)
            raise
        now = time.monotonic()
        self._models, self._fetched_at, self._failure = models, now, None
        self._ready_seen.update((name, now) for name, m in models.items() if m.ready)

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
        await background.stop(self._background)
        self._background = None
