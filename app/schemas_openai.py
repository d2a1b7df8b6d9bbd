"""Schemas of the OpenAI-compatible surface (/v1): requests as OpenAI's API defines them (the
fields this platform honours; anything else that would change the answer is refused by the
service, naming it), and the objects it answers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# NUL cannot be stored in Postgres (text or JSONB): refused here with the field named.
NoNul = Annotated[str, Field(pattern=r"^[^\x00]*$")]


def storable_json(value: object) -> None:
    """ValueError unless Postgres can store every string in `value` (decoded JSON of any shape): no
    NUL, no lone surrogate (which JSON's \\u escapes can carry)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise ValueError(f"strings must not contain NUL characters (got {item[:40]!r})")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"strings must be valid Unicode (got {item[:40]!r})") from None


StopString = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00]*$")]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: NoNul


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, description="A `data:image/png;base64,…` or `data:image/jpeg;…` URL.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    # Before `content`: whether a message without content is valid depends on it.
    image: str | None = Field(
        default=None,
        description="Non-standard, sent by some clients: one image as a data URL, or a markdown "
        "image link around one (`![](data:…)`).",
    )
    content: NoNul | Annotated[list[ContentPart], Field(min_length=1)] | None = Field(
        default=None, validate_default=True
    )
    name: Annotated[str, Field(max_length=64, pattern=r"^[^\x00]*$")] | None = None
    # What the SDK sends back with an earlier answer (`messages.append(choice.message)`): accepted
    # null or empty, since then they change nothing; this platform has no tools, refusals or audio.
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _required(cls, value: object, info: ValidationInfo) -> object:
        if value is None and info.data.get("image") is None:
            raise ValueError("a message needs content: a string or a list of parts")
        return value

    @field_validator("refusal", "tool_calls", "function_call", "audio", "annotations")
    @classmethod
    def _empty(cls, value: object, info: ValidationInfo) -> object:
        if value:
            raise ValueError(f"{info.field_name} is not supported here: only null or empty is accepted")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    # OpenAI pads chunks with random text against side channels unless this is false; this server
    # never pads, which either value allows.
    include_obfuscation: bool | None = None


class _Common(BaseModel):
    """Fields shared by chat and completions. Unknown fields are kept (`extra`) so that the service
    can refuse those it does not support by name instead of ignoring them."""

    # Strict, as OpenAI's API: "5" is not a number, nor true a count (lax parsing would accept both).
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=255)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int | None = Field(default=None, ge=1, description="Choices: each one is a job of its own.")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    ignore_eos: bool | None = Field(
        default=None, description="vLLM's extension: generate max_tokens tokens even past the end of text."
    )
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256, pattern=r"^[^\x00]*$")] | None = None
    metadata: (
        Annotated[
            dict[
                Annotated[str, Field(max_length=64, pattern=r"^[^\x00]*$")],
                Annotated[str, Field(max_length=512, pattern=r"^[^\x00]*$")],
            ],
            Field(max_length=16),
        ]
        | None
    ) = Field(default=None, description="Stored with the job (up to 16 string pairs).")

    @field_validator("stream_options")
    @classmethod
    def _only_when_streamed(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extra variables for the model's chat template (e.g. enable_thinking)."
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _storable(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        storable_json(value)
        return value


class CompletionRequest(_Common):
    prompt: NoNul | Annotated[list[NoNul], Field(min_length=1, max_length=64)]

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_only(cls, value: object) -> object:
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(i, int) or (isinstance(i, list) and i) for i in items):
            raise ValueError(
                "token ids are not supported as a prompt: send text (a string or a list of strings)"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if (value if isinstance(value, list) else [value]).count("") or value == []:
            raise ValueError("a prompt must not be empty")
        return value


# ---------------------------------------------------------------- answers


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None
    result_id: str = Field(description="The job behind this choice (GET /results/{id}).")


class ChatCompletion(BaseModel):
    id: str = Field(description="The result id of the first choice's job.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None
    result_id: str = Field(description="The job behind this choice (GET /results/{id}).")


class Completion(BaseModel):
    id: str = Field(description="The result id of the first choice's job.")
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "triton"
    ready: bool = Field(description="Loaded and ready in Triton.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class OpenAIErrorDetail(BaseModel):
    # Every field is always sent (null when it does not apply), as OpenAI does.
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
