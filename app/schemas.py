"""Pydantic schemas of the HTTP API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.models import ResultStatus

T = TypeVar("T")


class ContextCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, description="The prompt text, sent to the model as is.")

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("content must not be blank")
        if "\x00" in value:
            raise ValueError("content must not contain NUL characters")
        return value


class ContextOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant: str
    content: str
    created_at: datetime


class SamplingParams(BaseModel):
    """Sampling parameters passed to vLLM (a subset of SamplingParams, validated here)."""

    # Strict: "5" is not a number, nor true a seed. NaN would fail the bounds with a wrong message.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_tokens: int = Field(default=256, ge=1, description="Upper bound on generated tokens.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # NUL cannot be stored in Postgres (text or JSONB): refused here with the field named.
    stop: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00]*$")]], Field(max_length=16)
    ] = Field(default_factory=list, description="Strings that end generation (not included in the output).")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    ignore_eos: bool = Field(
        default=False, description="Generate max_tokens tokens even past the end of text."
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class SendOptions(SamplingParams):
    """The body of a send: sampling parameters, and how the context becomes the prompt."""

    chat: bool = Field(
        default=False,
        description="Send the context as one user message through the model's chat template (the "
        "model folder's chat_template.jinja) instead of as a raw prompt.",
    )
    stream: bool = Field(
        default=False,
        description="Stream the text as it is generated: read it live from `GET /results/{id}/stream` "
        "(a job sent without it is streamed there only once it ends), and a cancelled job keeps what "
        "it had produced.",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=7 * 24 * 3600,
        description="The job's own deadline, in seconds from now: not finished by then, it ends "
        "`cancelled` (its generation aborted) with an error saying the deadline passed.",
    )


class SendAccepted(BaseModel):
    result_id: uuid.UUID
    status: ResultStatus
    model: str
    context_id: uuid.UUID
    created_at: datetime
    url: str = Field(description="Where to poll the result.")


class ResultOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant: str
    context_id: uuid.UUID
    model: str
    params: dict[str, Any]
    status: ResultStatus
    output: str | None
    error: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    images: int = Field(0, description="Images the job carries (sent in its messages; not repeated here).")

    @model_validator(mode="before")
    @classmethod
    def _images_counted(cls, row: Any) -> Any:
        """A row's images (base64, up to MBs each) stay in the job; every poll would send them again."""
        if isinstance(row, dict) and isinstance(row.get("params"), dict) and "image" in row["params"]:
            params = dict(row["params"])
            images = params.pop("image")
            return {**row, "params": params, "images": len(images) if isinstance(images, list) else 1}
        return row


PAGE_LIMIT = (
    "Most items in the page. A page also ends once it holds PAGE_MAX_BYTES of text (4 MiB by default; "
    "one item at least): follow `next_cursor` until it is null."
)


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


class ModelInfo(BaseModel):
    name: str
    version: str | None
    state: str | None
    ready: bool
    reason: str | None = None


class ComponentHealth(BaseModel):
    ok: bool
    detail: str | None = None


class Readiness(BaseModel):
    status: str
    components: dict[str, ComponentHealth]


TenantName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


# Shown in listings and on terminals: no control or bidirectional-override characters.
KeyName = Annotated[
    str, Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$")
]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as the send body: "5" is not a count

    tenant: TenantName
    name: KeyName

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name must not be blank")
        return value

    scope: Literal["user", "admin"] = "user"
    max_pending: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Overrides the tenant's cap."
    )
    submit_rate_per_s: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Overrides the default rate."
    )


class ApiKeyOut(BaseModel):
    """A key as listed: never the key itself."""

    id: uuid.UUID
    tenant: str
    name: str
    scope: str
    prefix: str = Field(description="The key's first characters, to recognise it.")
    max_pending: int | None
    submit_rate_per_s: int | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The key itself: shown this once, stored only as a hash.")


class TenantLimitsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    max_pending: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="null: the MAX_PENDING_PER_TENANT setting"
    )
    submit_rate_per_s: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="null: the SUBMIT_RATE_PER_KEY setting"
    )


class TenantLimitsOut(TenantLimitsIn):
    tenant: str
    updated_at: datetime | None = Field(description="when the limits were last set; null: never")
    effective_max_pending: int = Field(description="the cap a key of this tenant without its own gets")
    effective_submit_rate_per_s: int = Field(description="the rate a key of this tenant without its own gets")


class ErrorBody(BaseModel):
    error: str
    detail: Any = Field(description="More about the error (null when there is nothing more)")
