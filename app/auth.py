"""API keys: who is calling, for which tenant, with which scope and limits.

Every request but health and the API docs passes the `Authentication` middleware, in front of
routing and body parsing, so no operation can be served without a key. Keys are `llmq_` + 256 random bits; only
their SHA-256 is stored. An API process keeps what it read about a key for KEY_CACHE_TTL_S, so a
request costs no database round trip (a key in use is re-read ahead, in the background); past that
time a request waits for the re-read, so a revocation is seen by every process within it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from app.background import Refreshes
from app.bodylimit import discard_body
from app.config import API_KEY_SHAPE, Settings
from app.db import DATABASE_ERRORS, Database
from app.errors import DATABASE_DOWN, AppError, render_error
from app.models import DEFAULT_TENANT
from app.repositories import api_keys as repo

log = logging.getLogger(__name__)

KEY_PREFIX = "llmq_"
KeyScope = Literal["user", "admin"]
_TOUCH_EVERY_S = 60.0  # last_used_at is a hint, written at most once a minute per key and process


@dataclass(frozen=True)
class Principal:
    """The caller. `key_id` is None for the bootstrap ADMIN_API_KEY."""

    key_id: uuid.UUID | None
    tenant: str
    scope: KeyScope
    max_pending: int
    submit_rate_per_s: int

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    @property
    def tenant_filter(self) -> str | None:
        """The tenant a read is confined to; None for an admin (every tenant)."""
        return None if self.is_admin else self.tenant

    def listing_tenant(self, tenant: str | None) -> str | None:
        """The tenant a listing shows: the key's own, or for an admin the `tenant` filter (None: all).
        A user key naming another tenant is refused rather than silently shown its own rows."""
        if self.is_admin:
            return tenant
        if tenant is not None and tenant != self.tenant:
            raise Forbidden(
                "the tenant filter needs an admin key: a user key sees its own tenant's rows only",
                detail={"field": "query.tenant"},
            )
        return self.tenant

    @property
    def rate_key(self) -> str:
        return str(self.key_id) if self.key_id else "bootstrap-admin"


class Unauthenticated(AppError):
    status_code = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(AppError):
    status_code = 403


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 6]


class KeyRing:
    """What this process knows about keys: the bootstrap key, and a short-lived cache of the table."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._bootstrap_hash = key_hash(settings.ADMIN_API_KEY) if settings.ADMIN_API_KEY else None
        self._cache: dict[bytes, tuple[Principal | None, float]] = {}  # digest -> (principal, fresh until)
        self._touched: dict[uuid.UUID, float] = {}
        self._reading: dict[bytes, asyncio.Future[tuple[Principal | None, float]]] = {}
        self._background = Refreshes("API key re-read or last-use write")

    async def principal(self, key: str) -> Principal | None:
        digest = key_hash(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is None or cached[1] <= now:
            # Unknown or expired: this request waits for the read (one read for a burst), so a
            # revocation is never answered from the cache past KEY_CACHE_TTL_S.
            cached = await self._read(digest)
        elif cached[1] - now < self.settings.KEY_CACHE_TTL_S / 2:
            # Half its time left: re-read ahead in the background, so a key in use never waits.
            known = cached[0]
            label = f"key {known.key_id}" if known is not None and known.key_id else "an unknown key"
            self._background.start(digest, lambda: self._read(digest), label)
        principal = cached[0]
        if principal is not None and principal.key_id is not None:
            self._touch(principal.key_id, now)
        return principal

    async def _read(self, digest: bytes) -> tuple[Principal | None, float]:
        """The key read again; concurrent callers share one read, which none of them can cancel."""
        reading = self._reading.get(digest)
        if reading is None:
            reading = asyncio.ensure_future(self._refresh(digest))
            self._reading[digest] = reading
            reading.add_done_callback(lambda done: self._read_done(digest, done))
        return await asyncio.shield(reading)

    def _read_done(self, digest: bytes, done: asyncio.Future[tuple[Principal | None, float]]) -> None:
        self._reading.pop(digest, None)
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have gone, the next one reads again

    async def _refresh(self, digest: bytes) -> tuple[Principal | None, float]:
        entry = (await self._load(digest), time.monotonic() + self.settings.KEY_CACHE_TTL_S)
        if len(self._cache) > 100_000:  # unknown keys are cached too: bound the memory
            self._cache.clear()
        self._cache[digest] = entry
        return entry

    async def _load(self, digest: bytes) -> Principal | None:
        if self._bootstrap_hash is not None and hmac.compare_digest(digest, self._bootstrap_hash):
            # The bootstrap key is tenant `default`'s admin: that tenant's limits apply to it too.
            async with self.db.connection() as conn:
                limits = await repo.tenant_limits(conn, DEFAULT_TENANT)
            return Principal(
                key_id=None,
                tenant=DEFAULT_TENANT,
                scope="admin",
                max_pending=limits["max_pending"] or self.settings.MAX_PENDING_PER_TENANT,
                submit_rate_per_s=limits["submit_rate_per_s"] or self.settings.SUBMIT_RATE_PER_KEY,
            )
        async with self.db.connection() as conn:
            row = await repo.by_hash(conn, digest)
        if (
            row is None
            or row["revoked_at"] is not None
            or not hmac.compare_digest(bytes(row["hash"]), digest)
        ):
            return None
        return Principal(
            key_id=row["id"],
            tenant=row["tenant"],
            scope=row["scope"],
            max_pending=row["max_pending"] or self.settings.MAX_PENDING_PER_TENANT,
            submit_rate_per_s=row["submit_rate_per_s"] or self.settings.SUBMIT_RATE_PER_KEY,
        )

    def forget(self, key_id: uuid.UUID) -> None:
        """This process sees a revocation at once (the others within KEY_CACHE_TTL_S)."""
        for digest, (principal, _) in list(self._cache.items()):
            if principal is not None and principal.key_id == key_id:
                del self._cache[digest]

    def forget_all(self) -> None:
        self._cache.clear()

    def _touch(self, key_id: uuid.UUID, now: float) -> None:
        if now - self._touched.get(key_id, float("-inf")) < _TOUCH_EVERY_S:
            return
        self._touched[key_id] = now
        self._background.start(key_id, lambda: self._write_touch(key_id))  # a hint: never fails a request

    async def _write_touch(self, key_id: uuid.UUID) -> None:
        async with self.db.connection() as conn:
            await repo.touch(conn, [key_id])


# Open to anyone: liveness, readiness and the API description.
PUBLIC_PATHS = frozenset(
    {"/health", "/health/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)


class Authentication:
    """The one authentication step, in front of routing and body parsing: every request but the
    public paths carries a valid key, or is answered 401 before anything else happens."""

    def __init__(self, app: ASGIApp, keyring: KeyRing) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            principal = await self._principal(scope)
        except AppError as exc:
            await discard_body(receive)  # a client still sending must receive the answer
            answer = render_error(scope["path"], exc.status_code, exc.message, exc.detail, exc.headers)
            await answer(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _principal(self, scope: Scope) -> Principal:
        headers = [v for k, v in scope["headers"] if k == b"authorization"]
        if not headers:
            raise Unauthenticated("missing API key: send the header 'Authorization: Bearer <API key>'")
        if len(headers) > 1:  # which one counts would depend on each proxy on the way: neither
            raise Unauthenticated("more than one Authorization header: send one")
        header = headers[0]
        scheme, _, token = header.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("malformed Authorization header: expected 'Bearer <API key>'")
        if not API_KEY_SHAPE.fullmatch(token):
            raise Unauthenticated(f"malformed API key: keys look like '{KEY_PREFIX}…'")
        try:
            principal = await self.keyring.principal(token)
        except DATABASE_ERRORS as exc:
            log.warning("API key lookup failed: %s", exc)
            raise AppError(DATABASE_DOWN, status_code=503) from exc
        if principal is None:
            raise Unauthenticated("unknown or revoked API key")
        return principal


def check_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise Forbidden("this operation needs an admin key")
