"""Settings: one object, read from the environment and the env file (`.env.api.dev` by default)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ModelWrapValidatorHandler, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that only make sense on a developer machine; refused in production.
DEV_DB_PASSWORDS = frozenset({"postgres", "dev", "devpassword", "changeme"})
DEV_ADMIN_API_KEY = "llmq_dev-admin-key-for-this-machine-only"
# What a request's key must look like (app/auth.py); ADMIN_API_KEY is held to it too.
API_KEY_SHAPE = re.compile(r"llmq_[A-Za-z0-9_\-]{20,200}")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# gRPC takes host:port, no scheme: a hostname, an IPv4 address or a bracketed IPv6 one.
GRPC_TARGET = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-_]*):([0-9]{1,5})")


def _env_file() -> str | None:
    """The development env file, unless another is named; none in production, whose settings
    must not fall back to development values."""
    if "APP_ENV_FILE" in os.environ:
        return os.environ["APP_ENV_FILE"] or None
    return None if os.environ.get("APP_ENV") == "production" else ".env.api.dev"


class SettingsError(ValueError):
    """Settings that cannot be used: one line per problem, never the values (they may be secrets)."""

    @classmethod
    def of(cls, exc: ValidationError) -> SettingsError:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            where = ".".join(str(part) for part in error["loc"])
            problems.append(f"{where}: {message}" if where else message)
        return cls("invalid settings: " + "; ".join(problems))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=_env_file(),
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=True,
    )

    APP_ENV: Literal["development", "test", "production"] = "development"
    LOG_LEVEL: str = "INFO"  # any case; held upper-case

    DATABASE_URL: str = "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/llmq"
    # The API's pool: fixed size, every connection opened at startup.
    DB_POOL_SIZE: int = Field(default=20, ge=1, le=500)
    # While Postgres fails, the longest wait for a connection: past it the request answers 503. Under
    # a second so that with Postgres down every request still gets its answer within one.
    DB_CONNECT_TIMEOUT_S: float = Field(default=0.5, gt=0, le=60)
    # While Postgres answers, how long a request may queue for one of the pool's connections (a
    # busy pool under a burst is a queue, not an outage).
    DB_POOL_WAIT_S: float = Field(default=10.0, gt=0, le=120)

    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    # Queue name so several deployments (or the test suite) can share one Redis.
    CELERY_QUEUE: str = Field(default="llm", pattern=r"^[A-Za-z0-9_.:\-]+$")

    # Triton: HTTP for admin (health, repository index), gRPC for inference (streaming API,
    # which the decoupled vLLM backend requires).
    TRITON_URL: str = "http://127.0.0.1:8000"
    TRITON_GRPC_URL: str = "127.0.0.1:8001"
    TRITON_METRICS_URL: str = "http://127.0.0.1:8002/metrics"
    TRITON_CONNECT_TIMEOUT_S: float = Field(default=5.0, gt=0)
    TRITON_REQUEST_TIMEOUT_S: float = Field(default=600.0, gt=0)
    # How long the API trusts its copy of Triton's model list when validating a submit.
    MODEL_CACHE_TTL_S: float = Field(default=5.0, ge=0)
    # While Triton is unreachable the API still accepts jobs for a model it saw ready this recently
    # (they wait for Triton); 0: refuse them (503).
    MODEL_READY_WINDOW_S: float = Field(default=600.0, ge=0)

    # `make dev`: where the API listens.
    API_HOST: str = "127.0.0.1"
    API_PORT: int = Field(default=8887, ge=1, le=65535)

    # Worker
    WORKER_IN_FLIGHT: int = Field(default=64, ge=1, le=4096)
    JOB_MAX_ATTEMPTS: int = Field(default=5, ge=1, le=100)
    RETRY_BACKOFF_BASE_S: float = Field(default=1.0, gt=0)
    RETRY_BACKOFF_MAX_S: float = Field(default=60.0, gt=0)
    # A worker holds a lease on each job it runs, renewed by its heartbeat every LEASE_RENEW_S; a
    # lease not renewed for LEASE_S (the worker died) lets the sweeper run the job again.
    LEASE_S: float = Field(default=10.0, gt=0)
    LEASE_RENEW_S: float = Field(default=3.0, gt=0)
    # How often a worker whose Triton is unreachable checks whether it is back.
    TRITON_PROBE_S: float = Field(default=1.0, gt=0)
    # Every worker process runs the sweeper loop; one at a time works (a Postgres advisory lock).
    WORKER_SWEEPER: bool = True
    # Sweeper: a pending job not started after this long has lost its message: enqueue it again.
    SWEEP_INTERVAL_S: float = Field(default=5.0, gt=0)
    SWEEP_REQUEUE_AFTER_S: float = Field(default=120.0, gt=0)
    # The same when the broker's queue is empty (no message can still be waiting for a worker).
    SWEEP_LOST_AFTER_S: float = Field(default=15.0, gt=0)
    # A job still pending this long after it was created fails with a clear error.
    JOB_DEADLINE_S: float = Field(default=3600.0, gt=0)
    # Token streams (jobs sent with "stream": true): kept this long after their last piece.
    STREAM_TTL_S: int = Field(default=3600, ge=10)
    # A cancel of a running job waits up to this long for the worker to record what it had produced.
    CANCEL_PARTIAL_WAIT_S: float = Field(default=1.0, ge=0, le=10)
    # A warm shutdown (SIGTERM) lets running jobs end for this long, then hands the others back to the
    # queue (generation aborted, attempt not spent) for another worker to start at once.
    WORKER_SHUTDOWN_GRACE_S: float = Field(default=8.0, ge=0, le=86400)
    # Where a worker process serves its Prometheus metrics (worker/metrics.py); unset or empty: none.
    # One port per process: several workers on one host each need their own.
    WORKER_METRICS_PORT: int | None = Field(default=None, ge=1, le=65535)
    WORKER_METRICS_HOST: str = "127.0.0.1"

    # Keys and quotas. ADMIN_API_KEY is the first admin key (tenant "default"); more keys are made
    # with POST /admin/keys or `python -m app.cli keys create`.
    ADMIN_API_KEY: str | None = Field(default=None, min_length=32)  # empty: unset
    # How long an API process trusts what it read about a key (a revocation takes effect within it).
    KEY_CACHE_TTL_S: float = Field(default=5.0, ge=0, le=60)
    # Per tenant: jobs pending at once; per key: jobs (and, apart, contexts) submitted per second.
    # Overridable per tenant or key.
    MAX_PENDING_PER_TENANT: int = Field(default=10_000, ge=1)
    SUBMIT_RATE_PER_KEY: int = Field(default=1_000, ge=1)
    # How often an API process re-reads a tenant's count of pending jobs (0: on every submit).
    QUOTA_PENDING_REFRESH_S: float = Field(default=1.0, ge=0, le=60)

    # Where models' chat templates are found: <dir>/<model>/chat_template.jinja (comma-separated).
    CHAT_TEMPLATES_DIRS: str = "triton_models"

    # Limits on input
    MAX_CONTENT_BYTES: int = Field(default=256 * 1024, ge=1)
    MAX_TOKENS_LIMIT: int = Field(default=8192, ge=1)

    # OpenAI-compatible /v1: how long a call waits for its jobs (they go on after it), the most
    # choices per call, the largest image (decoded bytes) and the hosts remote image URLs may name
    # (comma-separated; empty: remote URLs refused, nothing is fetched). The wait ends before the
    # OpenAI SDKs' default timeout (600 s): else the SDK gives up first and retries, creating the jobs anew.
    OPENAI_WAIT_S: float = Field(default=570.0, gt=0, le=3600)
    # max_tokens of a chat call that sets none (vLLM's own default, 16, is too short for chat).
    OPENAI_DEFAULT_MAX_TOKENS: int = Field(default=256, ge=1)
    OPENAI_MAX_N: int = Field(default=16, ge=1, le=128)
    OPENAI_MAX_IMAGE_BYTES: int = Field(default=1024 * 1024, ge=1)
    OPENAI_IMAGE_HOSTS: str = ""
    # Export: rows read per page while streaming JSON lines.
    EXPORT_PAGE_SIZE: int = Field(default=500, ge=1, le=10_000)
    # Bytes of text a listing page or an export page holds at most (one row always): rows can be
    # hundreds of KB each, and a page is built in memory.
    PAGE_MAX_BYTES: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    # FastAPI's native OpenTelemetry (spans, metrics, logs through the providers configured in the
    # process, e.g. by `opentelemetry-instrument`). Off, FastAPI skips its per-request look for
    # providers (about 5 % of the API's CPU per request).
    OPENTELEMETRY: bool = False
    # Web origins whose pages may call the API from a browser (CORS; comma-separated, e.g.
    # https://dashboard.example.com). Empty: no cross-origin answers.
    CORS_ALLOW_ORIGINS: str = ""

    @field_validator("CORS_ALLOW_ORIGINS")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in filter(None, (o.strip() for o in value.split(","))):
            parts = urlsplit(origin)
            if origin == "*" or parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
                raise ValueError(
                    f"{origin!r} is not an origin like https://dashboard.example.com (no path, no '*': "
                    "a key is a credential, not for every site)"
                )
        return value

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.CORS_ALLOW_ORIGINS.split(",") if o.strip()]

    @field_validator("ADMIN_API_KEY", "WORKER_METRICS_PORT", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("ADMIN_API_KEY")
    @classmethod
    def _shaped_like_a_key(cls, value: str | None) -> str | None:
        if value is not None and not API_KEY_SHAPE.fullmatch(value):
            raise ValueError(
                "must look like the keys the API accepts: 'llmq_' then 20 to 200 of A-Z a-z 0-9 _ - "
                """(python -c "import secrets; print('llmq_' + secrets.token_urlsafe(32))")"""
            )
        return value

    @field_validator("DATABASE_URL")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            url = None
        if url is None or url.get_backend_name() != "postgresql" or not url.database:
            raise ValueError("must be a URL like postgresql+psycopg://user:password@host:5432/database")
        return value

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("LOG_LEVEL")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (any case)")
        return value.upper()

    @field_validator("TRITON_GRPC_URL")
    @classmethod
    def _grpc_target(cls, value: str) -> str:
        target = GRPC_TARGET.fullmatch(value)
        if target is None or not 1 <= int(target.group(1)) <= 65535:
            raise ValueError("must be host:port without a scheme (e.g. 127.0.0.1:8001), port 1 to 65535")
        return value

    @field_validator("TRITON_URL", "TRITON_METRICS_URL")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        """Invalid fields and the checks across fields, reported together: pydantic skips the latter
        while any field is invalid, and an operator would fix one round of problems to meet the next."""
        try:
            settings = handler(data)
        except ValidationError as exc:
            invalid = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
            try:  # the invalid ones at their defaults; the checks that read them are skipped
                valid = {k: v for k, v in data.items() if k not in invalid} if isinstance(data, dict) else {}
                across = handler(valid)._problems_across(skip=invalid)
            except ValidationError:
                across = []
            errors: list[InitErrorDetails] = [
                {"type": PydanticCustomError(e["type"], e["msg"]), "loc": e["loc"], "input": e["input"]}
                for e in exc.errors()
            ]
            errors += [
                {"type": PydanticCustomError("value_error", p), "loc": (), "input": None} for p in across
            ]
            raise ValidationError.from_exception_data(exc.title, errors) from None
        problems = settings._problems_across(skip=set())
        if problems:
            raise ValidationError.from_exception_data(
                cls.__name__,
                [{"type": PydanticCustomError("value_error", p), "loc": (), "input": None} for p in problems],
            )
        return settings

    def _problems_across(self, skip: set[str]) -> list[str]:
        """What is wrong with settings taken together (or with the env file), leaving out the checks
        that read a setting in `skip` (invalid, so at its default here)."""
        problems = []
        named = os.environ.get("APP_ENV_FILE")
        if named and (not os.path.exists(named) or os.path.isdir(named)):
            problems.append("APP_ENV_FILE names a file that does not exist (empty: no env file)")
        if self.APP_ENV == "production" and "APP_ENV" not in skip:
            from sqlalchemy.engine import make_url

            if "DATABASE_URL" not in self.model_fields_set | skip:
                problems.append(
                    "DATABASE_URL is not set while APP_ENV=production (its default is the development database)"
                )
            # No password is fine (PGPASSWORD, .pgpass, certificates); a development one is not.
            elif "DATABASE_URL" not in skip and make_url(self.DATABASE_URL).password in DEV_DB_PASSWORDS:
                problems.append(
                    "DATABASE_URL uses a development password while APP_ENV=production; set a real secret"
                )
            if self.ADMIN_API_KEY == DEV_ADMIN_API_KEY and "ADMIN_API_KEY" not in skip:
                problems.append(
                    "ADMIN_API_KEY is the development key while APP_ENV=production; set a real secret "
                    "or leave it unset (ADMIN_API_KEY=)"
                )
        if self.LEASE_RENEW_S >= self.LEASE_S and not {"LEASE_S", "LEASE_RENEW_S"} & skip:
            problems.append(
                f"LEASE_RENEW_S ({self.LEASE_RENEW_S:g}) must be shorter than LEASE_S ({self.LEASE_S:g})"
            )
        return problems


@lru_cache
def get_settings() -> Settings:
    """The process's settings; SettingsError (one line, no values) when they cannot be used."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError.of(exc) from None


def settings_or_exit() -> Settings:
    """The settings for an entry point (API, worker, CLI): unusable ones end the process with one
    line for the operator, not a traceback through the importer."""
    try:
        return get_settings()
    except SettingsError as exc:
        raise SystemExit(f"error: {exc}") from None
