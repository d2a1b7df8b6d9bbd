"""Chat templates render the exact prompt the model was trained on."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import InvalidInput
from app.templates import ChatTemplates

LOCAL_MODELS = Path(__file__).resolve().parents[2] / "nvidia_triton" / "localtriton" / "models"


def test_smollm2_chatml_with_its_default_system_prompt() -> None:
    templates = ChatTemplates([str(LOCAL_MODELS)])
    prompt = templates.render(
        "smollm2-135m-instruct", [{"role": "user", "content": "Write a haiku about GPUs."}]
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWrite a haiku about GPUs.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_a_system_message_replaces_the_default_one() -> None:
    templates = ChatTemplates([str(LOCAL_MODELS)])
    prompt = templates.render(
        "smollm2-135m-instruct",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    )
    assert (
        prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_model_without_a_template_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="model 'base-model' has no chat template") as refused:
        ChatTemplates([str(tmp_path), str(LOCAL_MODELS)]).render(
            "base-model", [{"role": "user", "content": "x"}]
        )
    assert refused.value.status_code == 400
    with pytest.raises(InvalidInput):  # no path tricks
        ChatTemplates([str(LOCAL_MODELS)]).render("../models/smollm2-135m-instruct", [])


def test_templates_are_sandboxed(tmp_path: Path) -> None:
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidInput, match="refused the request"):
        ChatTemplates([str(tmp_path)]).render("evil", [])
