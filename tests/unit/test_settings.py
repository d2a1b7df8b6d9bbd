"""Settings as an operator meets them: what is refused at start, and how it is said (one line, no
values: they may be secrets), by every entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import DEV_ADMIN_API_KEY, Settings, SettingsError
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
SECRET = "llmq_myRealButShortSecret"


def _start(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {
        k: v for k, v in os.environ.items() if k not in Settings.model_fields and k != "APP_ENV_FILE"
    }
    environ = {**inherited, "PATH": f"{BIN}:{os.environ['PATH']}", **env}
    return subprocess.run(argv, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)


ENTRY_POINTS = pytest.mark.parametrize(
    "argv",
    [
        [str(BIN / "uvicorn"), "app.asgi:app", "--port", "1"],
        [str(BIN / "celery"), "-A", "worker.celery_app", "worker"],
        [sys.executable, "-m", "app.cli", "keys", "list"],
        [sys.executable, "-m", "devstack", "up"],  # `make dev`
    ],
    ids=["api", "worker", "cli", "make-dev"],
)


def _one_line(started: subprocess.CompletedProcess[str], *secrets: str) -> str:
    assert started.returncode != 0
    output = started.stdout + started.stderr
    assert "Traceback" not in output and not [s for s in secrets if s in output], output
    [line] = [line for line in output.splitlines() if line.strip()]
    assert line.startswith("error: invalid settings: ")
    return line


@ENTRY_POINTS
def test_every_entry_point_refuses_bad_settings_in_one_line_without_their_values(argv: list[str]) -> None:
    bad = {
        "DATABASE_URL": "garbage",
        "WORKER_SWEEPER": "maybe",
        "LOG_LEVEL": "LOUD",
        "TRITON_GRPC_URL": "http://127.0.0.1:18911",
    }
    line = _one_line(_start(argv, ADMIN_API_KEY=SECRET, **bad), SECRET, *bad.values())
    for name in ("ADMIN_API_KEY", *bad):
        assert f"{name}: " in line
    assert "LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in line
    assert "TRITON_GRPC_URL: must be host:port without a scheme" in line


@ENTRY_POINTS
def test_every_entry_point_refuses_an_env_file_that_is_not_there(argv: list[str]) -> None:
    line = _one_line(_start(argv, APP_ENV_FILE="/nonexistent/llmq.env"), "/nonexistent")
    assert (
        line == "error: invalid settings: APP_ENV_FILE names a file that does not exist (empty: no env file)"
    )


def test_every_problem_is_reported_at_once() -> None:
    """Checks across settings are not held back by an invalid field (one round of fixes, not two)."""
    with pytest.raises(ValidationError) as raised:
        Settings(LOG_LEVEL="LOUD", TRITON_GRPC_URL="garbage", LEASE_RENEW_S=20)  # type: ignore[arg-type]
    message = str(SettingsError.of(raised.value))
    assert message.startswith("invalid settings: LOG_LEVEL: ")
    assert "TRITON_GRPC_URL: " in message
    assert message.endswith("; LEASE_RENEW_S (20) must be shorter than LEASE_S (10)")
    # A check reading an invalid setting is left out (it would compare with a default not asked for).
    with pytest.raises(ValidationError) as raised:
        Settings(LEASE_S="soon", LEASE_RENEW_S=20)  # type: ignore[arg-type]
    assert "shorter" not in str(SettingsError.of(raised.value))


def test_log_level_is_one_of_pythons_in_any_case() -> None:
    assert Settings(LOG_LEVEL="debug").LOG_LEVEL == "DEBUG"
    assert Settings(LOG_LEVEL="Warning").LOG_LEVEL == "WARNING"


@pytest.mark.parametrize("value", ["127.0.0.1:8001", "triton.internal:443", "[::1]:8001", "h:65535"])
def test_triton_grpc_url_is_host_and_port(value: str) -> None:
    assert value == Settings(TRITON_GRPC_URL=value).TRITON_GRPC_URL


def test_a_validation_error_never_carries_the_values() -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(ADMIN_API_KEY="llmq_" + "x" * 10 + "+/=" * 10)
    message = str(SettingsError.of(raised.value))
    assert "x" * 10 not in message and "ADMIN_API_KEY: must look like the keys the API accepts" in message
    with pytest.raises(ValidationError) as whole:  # a check across settings: the values are named
        Settings(ADMIN_API_KEY="llmq_" + "x" * 40, LEASE_RENEW_S=20)
    message = str(SettingsError.of(whole.value))
    assert message == "invalid settings: LEASE_RENEW_S (20) must be shorter than LEASE_S (10)"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ADMIN_API_KEY", "0123456789abcdef0123456789abcdef0123"),  # long enough, not a key's shape
        ("ADMIN_API_KEY", "llmq_abc+def/ghi=jkl" + "A" * 20),  # base64, not URL-safe
        ("DATABASE_URL", "mysql://x@h/db"),
        ("DATABASE_URL", "postgresql+psycopg://u:p@h:notaport/db"),
        ("REDIS_URL", "localhost:6379"),
        ("TRITON_URL", "garbage"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_LEVEL", ""),
        ("TRITON_GRPC_URL", "http://127.0.0.1:18911"),  # gRPC takes no scheme
        ("TRITON_GRPC_URL", "garbage"),
        ("TRITON_GRPC_URL", "127.0.0.1"),
        ("TRITON_GRPC_URL", "127.0.0.1:0"),
        ("TRITON_GRPC_URL", "127.0.0.1:65536"),
        ("TRITON_GRPC_URL", "127.0.0.1:8001/v2"),
        ("CELERY_QUEUE", ""),
        ("CELERY_QUEUE", "two words"),
    ],
)
def test_unusable_values_are_refused_at_start(name: str, value: str) -> None:
    with pytest.raises(ValidationError, match=name):
        Settings(**{name: value})  # type: ignore[arg-type]


def test_production_takes_no_development_values_and_no_password_is_fine() -> None:
    production = {"APP_ENV": "production", "DATABASE_URL": "postgresql+psycopg://app@db:5432/llmq"}
    # The development env file is not read: its admin key does not become production's.
    loaded = _start(
        [
            sys.executable,
            "-c",
            "from app.config import get_settings as g; s = g(); print(s.ADMIN_API_KEY, s.APP_ENV)",
        ],
        **production,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["None", "production"]
    # ADMIN_API_KEY= leaves it unset, as the production refusal advises.
    assert Settings(**production, ADMIN_API_KEY="").ADMIN_API_KEY is None  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="development key"):
        Settings(**production, ADMIN_API_KEY=DEV_ADMIN_API_KEY)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="development password"):
        Settings(APP_ENV="production", DATABASE_URL="postgresql+psycopg://postgres:postgres@db/llmq")


def test_production_reports_every_development_value_and_an_unset_database_url() -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(
            APP_ENV="production",
            DATABASE_URL="postgresql+psycopg://postgres:postgres@db/llmq",
            ADMIN_API_KEY=DEV_ADMIN_API_KEY,
        )
    assert str(SettingsError.of(raised.value)) == (
        "invalid settings: DATABASE_URL uses a development password while APP_ENV=production; set a real "
        "secret; ADMIN_API_KEY is the development key while APP_ENV=production; set a real secret or leave "
        "it unset (ADMIN_API_KEY=)"
    )
    # Unset, it is not a password the operator chose: say what is missing.
    unset = _start([sys.executable, "-m", "app.cli", "keys", "list"], APP_ENV="production", APP_ENV_FILE="")
    assert _one_line(unset) == (
        "error: invalid settings: DATABASE_URL is not set while APP_ENV=production (its default is the "
        "development database)"
    )


def test_a_v1_call_waits_less_than_the_openai_sdk_waits_for_it() -> None:
    """Else the SDK times out first and retries, and every retry creates the call's jobs again."""
    import openai

    from app.config import Settings

    assert openai.DEFAULT_TIMEOUT.read is not None
    assert Settings.model_fields["OPENAI_WAIT_S"].default <= openai.DEFAULT_TIMEOUT.read - 15


def test_stacks_sharing_a_redis_do_not_hear_each_others_workers() -> None:
    """Celery's default broadcast and event exchanges are shared by every app on the Redis: mingle
    synced with other stacks' workers and gossip logged their heartbeats."""
    from app.config import Settings
    from app.queue import make_celery

    one, other = (make_celery(Settings(CELERY_QUEUE=name)) for name in ("one", "other"))
    assert one.conf.control_exchange != other.conf.control_exchange
    assert one.conf.event_exchange != other.conf.event_exchange
    assert one.control.mailbox.namespace != other.control.mailbox.namespace  # the pidbox the broadcasts use


def test_httpx_request_lines_stay_out_of_the_log() -> None:
    import logging

    from app.logging_setup import configure_logging

    root, httpx_logger = logging.getLogger(), logging.getLogger("httpx")
    levels = root.level, httpx_logger.level
    root.setLevel(logging.INFO)  # LOG_LEVEL's default
    try:
        configure_logging()
        assert root.isEnabledFor(logging.INFO) and not httpx_logger.isEnabledFor(logging.INFO)
    finally:
        root.setLevel(levels[0])
        httpx_logger.setLevel(levels[1])
