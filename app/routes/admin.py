"""Admin operations: API keys and tenant limits (admin keys only)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Path

from app.auth import check_admin
from app.deps import Caller, Runtime, caller
from app.query import StrictQueryRoute
from app.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    ErrorBody,
    TenantLimitsIn,
    TenantLimitsOut,
)
from app.services import keys as service


async def admin_runtime(c: Caller = Depends(caller)) -> Runtime:
    check_admin(c.principal)
    return c.rt


router = APIRouter(
    route_class=StrictQueryRoute,
    prefix="/admin",
    tags=["admin"],
    responses={403: {"model": ErrorBody, "description": "Not an admin key"}},
)


@router.post("/keys", status_code=201, response_model=ApiKeyCreated)
async def create_key(spec: ApiKeyCreate, rt: Runtime = Depends(admin_runtime)) -> ApiKeyCreated:
    """Create a key for a tenant. The answer holds the key itself, this once only."""
    async with rt.db.connection() as conn:
        return await service.create_key(conn, spec)


@router.get("/keys", response_model=list[ApiKeyOut])
async def list_keys(rt: Runtime = Depends(admin_runtime)) -> list[ApiKeyOut]:
    """Every key, newest first, without secrets."""
    async with rt.db.connection() as conn:
        return await service.list_keys(conn)


@router.delete("/keys/{key_id}", response_model=ApiKeyOut, responses={404: {"model": ErrorBody}})
async def revoke_key(key_id: uuid.UUID, rt: Runtime = Depends(admin_runtime)) -> ApiKeyOut:
    """Revoke a key: refused by this API process at once, by every other within KEY_CACHE_TTL_S."""
    async with rt.db.connection() as conn:
        revoked, _ = await service.revoke_key(conn, key_id)
    rt.keyring.forget(key_id)
    return revoked


# Constrained here: the annotation's Field constraints are not applied to a path parameter.
_TENANT = Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@router.get("/tenants/{tenant}/limits", response_model=TenantLimitsOut)
async def get_tenant_limits(tenant: str = _TENANT, rt: Runtime = Depends(admin_runtime)) -> TenantLimitsOut:
    """A tenant's quotas as set (null: the settings' defaults) and as applied to its keys without their own."""
    async with rt.db.connection() as conn:
        return await service.tenant_limits(conn, tenant, rt.settings)


@router.put("/tenants/{tenant}/limits", response_model=TenantLimitsOut)
async def set_tenant_limits(
    limits: TenantLimitsIn, tenant: str = _TENANT, rt: Runtime = Depends(admin_runtime)
) -> TenantLimitsOut:
    """Set a tenant's quotas, both at once (null: the settings' defaults); keys may still override them."""
    async with rt.db.connection() as conn:
        updated = await service.set_tenant_limits(conn, tenant, limits, rt.settings)
    rt.keyring.forget_all()
    return updated
