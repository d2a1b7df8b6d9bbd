"""API keys and tenant limits, managed by admins (HTTP) and operators (`python -m app.cli`)."""

from __future__ import annotations

import uuid
from typing import Any

from app.auth import display_prefix, key_hash, new_key
from app.config import Settings
from app.db import AsyncConnection
from app.errors import NotFound
from app.repositories import api_keys as repo
from app.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, TenantLimitsIn, TenantLimitsOut


async def create_key(conn: AsyncConnection, spec: ApiKeyCreate) -> ApiKeyCreated:
    key = new_key()
    row = await repo.insert(
        conn,
        tenant=spec.tenant,
        name=spec.name,
        scope=spec.scope,
        hash=key_hash(key),
        prefix=display_prefix(key),
        max_pending=spec.max_pending,
        submit_rate_per_s=spec.submit_rate_per_s,
    )
    return ApiKeyCreated(**row, key=key)


async def list_keys(conn: AsyncConnection) -> list[ApiKeyOut]:
    return [ApiKeyOut.model_validate(row) for row in await repo.all_keys(conn)]


async def revoke_key(conn: AsyncConnection, key_id: uuid.UUID) -> tuple[ApiKeyOut, bool]:
    """The key, revoked, and whether it already was (revoking twice changes nothing)."""
    row = await repo.revoke(conn, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} not found")
    return ApiKeyOut.model_validate(row), bool(row["before"])


async def tenant_limits(conn: AsyncConnection, tenant: str, defaults: Settings) -> TenantLimitsOut:
    return _limits_out(tenant, await repo.tenant_limits(conn, tenant), defaults)


async def set_tenant_limits(
    conn: AsyncConnection, tenant: str, limits: TenantLimitsIn, defaults: Settings
) -> TenantLimitsOut:
    row = await repo.set_tenant_limits(conn, tenant, limits.max_pending, limits.submit_rate_per_s)
    return _limits_out(tenant, row, defaults)


def _limits_out(tenant: str, row: dict[str, Any], defaults: Settings) -> TenantLimitsOut:
    return TenantLimitsOut(
        tenant=tenant,
        max_pending=row["max_pending"],
        submit_rate_per_s=row["submit_rate_per_s"],
        updated_at=row["updated_at"],
        effective_max_pending=row["max_pending"] or defaults.MAX_PENDING_PER_TENANT,
        effective_submit_rate_per_s=row["submit_rate_per_s"] or defaults.SUBMIT_RATE_PER_KEY,
    )
