"""The lingering close after a malformed request patches only the uvicorn it was written for
(its effect, through the real server: tests/e2e/test_body_limit.py)."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterator

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app import http_linger


@pytest.fixture
def fresh_patch() -> Iterator[None]:
    """The patch applies once per process: forget that before and after the test."""
    http_linger.linger_after_bad_requests.cache_clear()  # type: ignore[attr-defined]
    yield
    http_linger.linger_after_bad_requests.cache_clear()  # type: ignore[attr-defined]


@pytest.mark.usefixtures("fresh_patch")
def test_another_uvicorn_keeps_its_own_close(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0.99.0")
    before = (HttpToolsProtocol.send_400_response, HttpToolsProtocol.data_received)
    with caplog.at_level(logging.WARNING, logger="app.version_guard"):
        assert http_linger.linger_after_bad_requests() is False
    assert (HttpToolsProtocol.send_400_response, HttpToolsProtocol.data_received) == before
    assert "uvicorn 0.99.0" in caplog.text and "not applied" in caplog.text
