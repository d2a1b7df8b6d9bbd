"""Chat templates: the raw prompt a model's vLLM backend expects for a conversation.

Triton's vLLM backend takes a raw prompt and applies no template, so the platform renders the
model's own template (Hugging Face `chat_template` format, a Jinja file in the model's folder:
`<dir>/<model>/chat_template.jinja` for each of CHAT_TEMPLATES_DIRS) in a sandboxed environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.errors import InvalidInput

TEMPLATE_FILE = "chat_template.jinja"


def _raise_exception(message: str) -> None:  # what HF templates call to refuse a conversation
    raise TemplateError(message)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_ENV.globals["raise_exception"] = _raise_exception


class ChatTemplates:
    def __init__(self, directories: list[str]) -> None:
        self.directories = [Path(d) for d in directories if d]

    def find(self, model: str) -> Path | None:
        if "/" in model or model.startswith("."):
            return None
        for directory in self.directories:
            path = directory / model / TEMPLATE_FILE
            if path.is_file():
                return path
        return None

    def render(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        path = self.find(model)
        if path is None:
            raise InvalidInput(
                f"model '{model}' has no chat template ({TEMPLATE_FILE} in its model folder): send a raw prompt",
                status_code=400,
                detail={"field": "chat"},
            )
        try:
            rendered: str = _compiled(str(path), path.stat().st_mtime).render(
                messages=messages, add_generation_prompt=True, **kwargs
            )
            return rendered
        except TemplateError as exc:
            raise InvalidInput(
                f"the chat template of '{model}' refused the request: {exc}", status_code=400
            ) from exc


@lru_cache(maxsize=64)
def _compiled(path: str, _mtime: float) -> Any:
    return _ENV.from_string(Path(path).read_text())
