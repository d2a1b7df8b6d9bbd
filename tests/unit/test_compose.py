"""docker-compose.yml cannot run here (no Docker engine): validate it against the Compose
specification (typed parser of the compose-spec) and check that it wires the stack as designed."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from compose_spec import PyOptions
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    parsed = PyOptions(apply_merge=True).from_yaml((ROOT / "docker-compose.yml").read_text())
    parsed.validate()
    spec: dict[str, Any] = parsed.to_dict()
    return spec


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"db", "redis", "migrate", "api", "worker", "triton"}
    assert services["triton"]["profiles"] == ["gpu"]
    assert all("profiles" not in s for name, s in services.items() if name != "triton")


def test_start_order_uses_health_conditions(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert s["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    for name in ("api", "worker"):
        assert s[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "redis": {"condition": "service_healthy"},
        }
    for name in ("db", "redis", "api", "worker", "triton"):
        test = s[name]["healthcheck"]["test"]
        # The parser keeps CMD lists and turns CMD-SHELL into a plain shell string.
        assert (isinstance(test, list) and test[0] == "CMD" and len(test) > 1) or (
            isinstance(test, str) and test
        )


def test_commands_point_at_real_code(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert s["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert (ROOT / "alembic.ini").is_file()
    api_cmd = s["api"]["command"]
    module, attr = api_cmd[1].split(":")
    assert hasattr(importlib.import_module(module), attr)
    assert api_cmd[api_cmd.index("--port") + 1] == "8887"
    assert s["api"]["ports"] == ["8887:8887"]
    worker_cmd = s["worker"]["command"]
    assert worker_cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    # No embedded beat: every worker runs the sweeper loop, one at a time (an advisory lock), so
    # `--scale worker=N` never gives a second sweeper.
    assert "-B" not in worker_cmd and "--beat" not in worker_cmd
    # The pool comes from the app's configuration (worker.pool.JobPool): a `-P` would override it.
    assert "-P" not in worker_cmd and "--pool" not in worker_cmd


def test_environment_and_env_files(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert s["db"]["env_file"] == [".env.db.dev"]
    db_env = dotenv_values(ROOT / ".env.db.dev")
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(db_env)
    api_env = dotenv_values(ROOT / ".env.api.dev")
    from app.config import Settings

    Settings.model_validate(api_env)  # every value in the dev env file is a valid setting
    for name in ("migrate", "api", "worker"):
        assert s[name]["env_file"] == [".env.api.dev"]
        env = s[name]["environment"]
        # Inside compose the services are reached by name, not 127.0.0.1.
        assert "@db:5432/" in env["DATABASE_URL"] and env["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["TRITON_GRPC_URL"].endswith("triton:8001}")


def test_gpu_triton_serves_the_model_repository(compose: dict[str, Any]) -> None:
    triton = compose["services"]["triton"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:") and triton["image"].endswith(
        "-vllm-python-py3"
    )
    assert "./triton_models:/models:ro" in triton["volumes"]
    assert (ROOT / "triton_models").is_dir()
    assert "--model-repository=/models" in triton["command"]
    assert set(triton["ports"]) == {"8000:8000", "8001:8001", "8002:8002"}
    devices = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["driver"] == "nvidia" and devices["capabilities"] == ["gpu"]


def test_dockerfile_ships_what_the_commands_need() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in ("app", "worker", "migrations", "alembic.ini", "pyproject.toml"):
        assert f"COPY {path}" in dockerfile or f" {path} " in dockerfile, path
