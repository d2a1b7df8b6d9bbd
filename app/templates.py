"""Chat templates: the raw prompt a model's vLLM backend expects for a conversation.

Triton's vLLM backend takes a raw prompt and applies no template, so the platform renders the
model's own template (Hugging Face `chat_template` format, a Jinja file in the model's folder:
`<dir>/<model>/chat_template.jinja` for each of CHAT_TEMPLATES_DIRS) in a sandboxed environment,
with `messages`, `add_generation_prompt=True`, the model's special tokens and the request's
`chat_template_kwargs`. An optional `chat.json` beside the template describes the model:

    {"special_tokens": {"bos_token": "...", "eos_token": "..."},   # variables the template uses
     "vision": true,                                             # takes images (the backend's `image` input)
     "image_placeholder": "<image>",                             # what an image part becomes in the text
     "content_format": "string"}                                 # "openai": content parts passed as a list

With the default `string` format a message whose content is a list of parts reaches the template
as one string (text parts joined by newlines, each image part as `image_placeholder`), which is
what templates written for string content (ChatML, DeepSeek) expect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.errors import InvalidInput

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "chat.json"


def _raise_exception(message: str) -> None:  # what HF templates call to refuse a conversation
    raise TemplateError(message)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_ENV.globals["raise_exception"] = _raise_exception


@dataclass(frozen=True)
class ChatModel:
    """What the model folder says about chatting with it."""

    template: Path
    special_tokens: dict[str, str] = field(default_factory=dict)
    vision: bool = False
    image_placeholder: str = ""
    content_format: str = "string"


class ChatTemplates:
    def __init__(self, directories: list[str]) -> None:
        self.directories = [Path(d) for d in directories if d]

    def find(self, model: str) -> Path | None:
        if "/" in model or "\\" in model or model.startswith("."):
            return None
        for directory in self.directories:
            path = directory / model / TEMPLATE_FILE
            if path.is_file():
                return path
        return None

    def model(self, model: str) -> ChatModel | None:
        """The model's template and chat.json; None when it has no template."""
        path = self.find(model)
        if path is None:
            return None
        config = path.with_name(CONFIG_FILE)
        return _chat_model(str(path), config.stat().st_mtime if config.is_file() else 0.0)

    def require(self, model: str) -> ChatModel:
        chat = self.model(model)
        if chat is None:
            raise InvalidInput(
                f"model '{model}' has no chat template ({TEMPLATE_FILE} in its model folder): send a raw prompt",
                status_code=400,
                detail={"field": "chat"},
            )
        return chat

    def render(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The prompt for `messages` (string content, or parts as `flatten_parts` takes them);
        `kwargs` are the request's chat_template_kwargs."""
        chat = self.require(model)
        if chat.content_format != "openai":
            messages = [flatten_parts(m, chat.image_placeholder) for m in messages]
        variables = {"add_generation_prompt": True, **chat.special_tokens, **kwargs, "messages": messages}
        try:
            rendered: str = _compiled(str(chat.template), chat.template.stat().st_mtime).render(**variables)
            return rendered
        # A template is code written for other inputs: whatever it trips on is the request's problem.
        except (TemplateError, TypeError, ValueError, LookupError, AttributeError) as exc:
            raise InvalidInput(
                f"the chat template of '{model}' refused the request: {exc}", status_code=400
            ) from exc


def flatten_parts(message: dict[str, Any], image_placeholder: str) -> dict[str, Any]:
    """A message whose content is a list of parts, with the content as one string."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    pieces = []
    for part in content:
        if part.get("type") == "text":
            pieces.append(str(part.get("text", "")))
        elif part.get("type") in ("image_url", "image"):
            pieces.append(image_placeholder)
    return {**message, "content": "\n".join(p for p in pieces if p)}


@lru_cache(maxsize=64)
def _chat_model(template: str, _config_mtime: float) -> ChatModel:
    path = Path(template).with_name(CONFIG_FILE)
    if not path.is_file():
        return ChatModel(Path(template))
    data = json.loads(path.read_text())
    return ChatModel(
        template=Path(template),
        special_tokens={str(k): str(v) for k, v in data.get("special_tokens", {}).items()},
        vision=bool(data.get("vision", False)),
        image_placeholder=str(data.get("image_placeholder", "")),
        content_format=str(data.get("content_format", "string")),
    )


@lru_cache(maxsize=64)
def _compiled(path: str, _mtime: float) -> Any:
    return _ENV.from_string(Path(path).read_text())
