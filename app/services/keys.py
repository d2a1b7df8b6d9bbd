"""API keys and tenant limits, managed by admins (HTTP) and operators (`python -m app.cli`)."""

from __future__ import annotations

import uuid

from app.auth import display_prefix, key_hash, new_key
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


async def revoke_key(conn: AsyncConnection, key_id: uuid.UUID) -> ApiKeyOut:
    row = await repo.revoke(conn, key_id)
    if row is None:
        raise NotFound(f"API key {key_id} not found")
    return ApiKeyOut.model_validate(row)


async def set_tenant_limits(conn: AsyncConnection, tenant: str, limits: TenantLimitsIn) -> TenantLimitsOut:
    row = await repo.set_tenant_limits(conn, tenant, limits.max_pending, limits.submit_rate_per_s)
    return TenantLimitsOut.model_validate(row)
