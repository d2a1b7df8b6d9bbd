"""FastAPI dependencies: the request's session, settings, Triton clients, the enqueuer."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.services.results import Enqueue
from app.triton.admin import ModelCatalog, TritonAdmin


def get_session(request: Request) -> Iterator[Session]:
    """One session per request: committed at the end, rolled back on error.

    Use with `scope="function"` so the commit (and the enqueues that wait for it) happens
    before the response is sent: a client that gets 202 can poll the row at once."""
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def settings_dep(request: Request) -> Settings:
    settings: Settings = getattr(request.app.state, "settings", None) or get_settings()
    return settings


def get_admin(request: Request) -> TritonAdmin:
    admin: TritonAdmin = request.app.state.triton_admin
    return admin


def get_catalog(request: Request) -> ModelCatalog:
    catalog: ModelCatalog = request.app.state.model_catalog
    return catalog


def get_enqueue(request: Request) -> Enqueue:
    enqueue: Enqueue = request.app.state.enqueue
    return enqueue


SessionDep = Depends(get_session, scope="function")
SettingsDep = Depends(settings_dep)
