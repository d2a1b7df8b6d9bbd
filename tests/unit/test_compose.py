"""docker-compose.yml cannot run here (no Docker engine): validate it against the Compose
specification (typed parser of the compose-spec) and check that it wires the stack as designed."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from compose_spec import PyOptions
from dotenv import dotenv_values
from sqlalchemy import make_url

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
    # The development admin key is in .env.api.dev: this machine only unless a proxy serves it.
    assert s["api"]["ports"] == ["127.0.0.1:8887:8887"]
    worker_cmd = s["worker"]["command"]
    assert worker_cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    # No embedded beat: every worker runs the sweeper loop, one at a time (an advisory lock), so
    # `--scale worker=N` never gives a second sweeper.
    assert "-B" not in worker_cmd and "--beat" not in worker_cmd
    # The pool comes from the app's configuration (worker.pool.JobPool): a `-P` would override it.
    assert "-P" not in worker_cmd and "--pool" not in worker_cmd


def _interpolate(value: str, shell: dict[str, str]) -> str:
    """Compose's interpolation of `${VAR}`, `${VAR:-default}` and `$$` (all this file uses)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return shell.get(match.group(1)) or (match.group(2) or "")

    return re.sub(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}", one, value)


def _container_env(service: dict[str, Any], shell: dict[str, str]) -> dict[str, str]:
    """What a container's environment would be: its env files, overridden by `environment`."""
    env: dict[str, str] = {}
    for env_file in service.get("env_file", []):
        path = ROOT / _interpolate(env_file, shell)
        env.update({k: v or "" for k, v in dotenv_values(path, interpolate=False).items()})
    env.update({k: _interpolate(str(v), shell) for k, v in service.get("environment", {}).items()})
    return env


@pytest.mark.parametrize(
    "shell",
    [{}, {"POSTGRES_USER": "llmq", "POSTGRES_PASSWORD": "s3cret-from-env", "POSTGRES_DB": "jobs"}],
    ids=["defaults", "set-by-the-operator"],
)
def test_database_credentials_have_one_source(compose: dict[str, Any], shell: dict[str, str]) -> None:
    s = compose["services"]
    db = _container_env(s["db"], shell)
    for name in ("migrate", "api", "worker"):
        url = make_url(_container_env(s[name], shell)["DATABASE_URL"])
        assert (url.username, url.password, url.database) == (
            db["POSTGRES_USER"],
            db["POSTGRES_PASSWORD"],
            db["POSTGRES_DB"],
        ), name


def test_the_development_db_env_file_holds_the_compose_defaults(compose: dict[str, Any]) -> None:
    """`--env-file .env.db.dev` and no env file at all give the same database."""
    dev = {k: v or "" for k, v in dotenv_values(ROOT / ".env.db.dev").items()}
    assert set(dev) == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
    assert _container_env(compose["services"]["db"], dev) == _container_env(compose["services"]["db"], {})


def test_environment_and_env_files(compose: dict[str, Any]) -> None:
    s = compose["services"]
    api_env = dotenv_values(ROOT / ".env.api.dev")
    from app.config import Settings

    Settings.model_validate(api_env)  # every value in the dev env file is a valid setting
    for name in ("migrate", "api", "worker"):
        assert s[name]["env_file"] == ["${API_ENV_FILE:-.env.api.dev}"]
        assert _interpolate(s[name]["env_file"][0], {}) == ".env.api.dev"
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
    # Triton has no authentication: published on this machine's loopback only.
    assert set(triton["ports"]) == {"127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"}
    devices = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["driver"] == "nvidia" and devices["capabilities"] == ["gpu"]


def test_gpu_triton_loads_one_model_that_fits_the_gpu(compose: dict[str, Any]) -> None:
    command = compose["services"]["triton"]["command"]
    assert "--model-control-mode=explicit" in command
    loads = [arg.removeprefix("--load-model=") for arg in command if arg.startswith("--load-model")]
    # Each model folder is tuned to have the GPU to itself: loading several runs out of memory.
    assert len(loads) == 1, loads
    chosen = re.fullmatch(r"\$\{TRITON_MODEL:-([^}]+)\}", loads[0])
    assert chosen, loads[0]
    default = ROOT / "triton_models" / chosen.group(1)
    assert (default / "config.pbtxt").is_file()
    engine_args = json.loads((default / "1" / "model.json").read_text())
    assert engine_args["gpu_memory_utilization"] <= 1.0


def test_dockerfile_ships_what_the_commands_need() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in ("app", "worker", "migrations", "alembic.ini", "pyproject.toml"):
        assert f"COPY {path}" in dockerfile or f" {path} " in dockerfile, path


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    # Docker's matching: `*` and `?` stay within a path segment, `**` spans segments.
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def _in_build_context(path: str) -> bool:
    """Whether .dockerignore lets `path` (relative to the root) into the build context, as Docker
    walks it: the last pattern matching a path or one of its parents decides, and an excluded
    folder is skipped unless an exception pattern starts with its literal path."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            raw = line.removeprefix("!").strip("/")
            patterns.append((line.startswith("!"), raw, _dockerignore_regex(raw)))

    def excluded(candidate: str) -> bool:
        parts = PurePosixPath(candidate).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for exception, _, regex in patterns:
            if any(regex.fullmatch(p) for p in prefixes):
                result = not exception
        return result

    parts = PurePosixPath(path).parts
    for n in range(1, len(parts)):
        folder = "/".join(parts[:n])
        if excluded(folder) and not any(e and raw.startswith(folder + "/") for e, raw, _ in patterns):
            return False
    return not excluded(path)


def test_image_ships_the_chat_templates_the_api_reads(compose: dict[str, Any]) -> None:
    from app.templates import CONFIG_FILE, TEMPLATE_FILE

    instructions = _dockerfile()
    workdir = PurePosixPath("/")
    image_dirs: dict[str, PurePosixPath] = {}  # each COPY source: where it lands in the image
    env: dict[str, str] = {}
    for instruction, args in instructions:
        if instruction == "WORKDIR":
            workdir = workdir / args
        elif instruction == "COPY":
            *sources, dest = shlex.split(args)
            for source in sources:
                image_dirs[source.rstrip("/")] = workdir / dest
        elif instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    # The API looks templates up in CHAT_TEMPLATES_DIRS: the image's copy of triton_models/.
    assert "triton_models" in image_dirs
    assert env.get("CHAT_TEMPLATES_DIRS") == str(image_dirs["triton_models"])
    for name in ("migrate", "api", "worker"):
        assert "CHAT_TEMPLATES_DIRS" not in _container_env(compose["services"][name], {}), name

    read_by_the_api = [
        path.relative_to(ROOT).as_posix()
        for model in sorted((ROOT / "triton_models").iterdir())
        for path in (model / TEMPLATE_FILE, model / CONFIG_FILE)
        if path.is_file()
    ]
    assert any(path.endswith(TEMPLATE_FILE) for path in read_by_the_api)
    for relative in read_by_the_api:
        assert _in_build_context(relative), relative
    # Nothing else of the model repository (no model weights in the image).
    for path in (ROOT / "triton_models").rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_file() and relative not in read_by_the_api:
            assert not _in_build_context(relative), relative


def test_workers_serve_metrics_and_keep_the_shared_environment(compose: dict[str, Any]) -> None:
    s = compose["services"]
    worker_env, api_env = s["worker"]["environment"], s["api"]["environment"]
    assert {k: worker_env[k] for k in api_env} == api_env  # the merge kept DATABASE_URL and the rest
    assert worker_env["WORKER_METRICS_PORT"] == "9108" and worker_env["WORKER_METRICS_HOST"] == "0.0.0.0"
    assert "WORKER_METRICS_PORT" not in api_env


@pytest.mark.parametrize("name", ["migrate", "api", "worker"])
def test_app_env_from_the_shell_makes_the_apps_refuse_development_secrets(
    compose: dict[str, Any], name: str
) -> None:
    from pydantic import ValidationError

    from app.config import Settings

    service = compose["services"][name]
    development = _container_env(service, {})
    assert development["APP_ENV"] == "development"
    Settings.model_validate(development)
    production = _container_env(service, {"APP_ENV": "production", "POSTGRES_PASSWORD": "s3cret-from-env"})
    assert production["APP_ENV"] == "production"
    with pytest.raises(ValidationError) as refused:
        Settings.model_validate(production)
    assert "ADMIN_API_KEY is the development key while APP_ENV=production" in str(refused.value)


def test_every_way_to_run_the_api_caps_its_connections(compose: dict[str, Any]) -> None:
    """Past the cap uvicorn answers 503 (app.http_protocol makes it the JSON error) instead of
    running out of file descriptors; the image, compose and `make dev` (devstack) agree."""
    from devstack.processes import api_process

    cmd = next(args for instruction, args in _dockerfile() if instruction == "CMD")
    commands = {
        "Dockerfile": json.loads(cmd),
        "compose": compose["services"]["api"]["command"],
        "devstack": api_process({}, ROOT / ".run" / "unused.log", port=8887).argv,
    }
    for where, argv in commands.items():
        assert "--limit-concurrency" in argv, where
        assert argv[argv.index("--limit-concurrency") + 1] == "1000", where
