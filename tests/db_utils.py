"""Test databases: fresh, and migrated with Alembic exactly as a deployment would be."""

from __future__ import annotations

from devstack.database import recreate_database as _recreate


def recreate_database(base_url: str, name: str) -> str:
    return _recreate(f"{base_url}/{name}")
