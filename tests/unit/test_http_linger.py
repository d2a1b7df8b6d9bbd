"""The lingering close after a malformed request patches only the uvicorn it was written for
(its effect, through the real server: tests/e2e/test_body_limit.py)."""

from __future__ import annotations

import importlib.metadata
import logging

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app import http_linger


def test_another_uvicorn_keeps_its_own_close(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(http_linger, "_applied", False)
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0.99.0")
    before = (HttpToolsProtocol.send_400_response, HttpToolsProtocol.data_received)
    with caplog.at_level(logging.WARNING, logger="app.version_guard"):
        assert http_linger.linger_after_bad_requests() is False
    assert (HttpToolsProtocol.send_400_response, HttpToolsProtocol.data_received) == before
    assert "uvicorn 0.99.0" in caplog.text and "not applied" in caplog.text
