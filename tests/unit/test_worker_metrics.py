"""worker/metrics.py's pure parts: the port setting, a port already taken, the outcomes' bound."""

from __future__ import annotations

import logging
import socket

import pytest

from app.config import Settings
from worker.metrics import WorkerMetrics, serve


def test_an_empty_port_setting_serves_no_metrics() -> None:
    settings = Settings(_env_file=None, WORKER_METRICS_PORT="")  # type: ignore[call-arg]
    assert settings.WORKER_METRICS_PORT is None
    assert serve(settings) is False


def test_a_port_already_taken_is_logged_and_the_worker_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(_env_file=None, WORKER_METRICS_PORT=port)  # type: ignore[call-arg]
        with caplog.at_level(logging.ERROR, logger="worker.metrics"):
            assert serve(settings) is False
    assert f"metrics: cannot listen on 127.0.0.1:{port}" in caplog.text


def test_an_unknown_outcome_is_refused_so_labels_stay_bounded() -> None:
    metrics = WorkerMetrics()
    metrics.job_ended("m", "completed")
    with pytest.raises(ValueError, match="unknown outcome"):
        metrics.job_ended("m", "whatever")


def test_triton_up_is_read_at_each_scrape() -> None:
    metrics = WorkerMetrics()
    down: list[str | None] = [None]
    metrics.watch_triton(lambda: down[0])
    assert metrics.registry.get_sample_value("llmq_worker_triton_up") == 1
    down[0] = "Triton unreachable"
    assert metrics.registry.get_sample_value("llmq_worker_triton_up") == 0
