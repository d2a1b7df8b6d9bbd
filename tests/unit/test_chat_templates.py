# DeepSeek's special tokens are spelled with FULLWIDTH VERTICAL LINE and LOWER ONE EIGHTH BLOCK on purpose.
# ruff: noqa: RUF001, RUF002
"""The production models' chat templates (triton_models/) render the exact prompts of the models'
published formats, written out by hand here: ChatML with Qwen's default system prompt for the
Qwen2.5 models, DeepSeek-R1's `<｜User｜>`/`<｜Assistant｜>` turns for the distilled model."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import InvalidInput
from app.templates import ChatTemplates

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ChatTemplates(
    [str(ROOT / "triton_models"), str(ROOT / "nvidia_triton" / "localtriton" / "models")]
)
QWEN_MODELS = ["Qwen2.5-1.5B-Instruct-AWQ", "Qwen2.5-7B-Instruct-AWQ", "Qwen2.5-14B-Instruct-AWQ"]
DEEPSEEK = "DeepSeek-R1-Distill-Qwen-1.5B"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>Greet back.</think>Hello!"},
    {"role": "user", "content": "2+2?"},
]


def test_every_production_model_has_a_template() -> None:
    folders = sorted(p.name for p in (ROOT / "triton_models").iterdir() if p.is_dir())
    assert folders == sorted([*QWEN_MODELS, DEEPSEEK])
    assert all(TEMPLATES.model(name) is not None for name in folders)


@pytest.mark.parametrize("model", QWEN_MODELS)
def test_qwen_is_chatml(model: str) -> None:
    assert TEMPLATES.render(model, CONVERSATION) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>Greet back.</think>Hello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("model", QWEN_MODELS)
def test_qwen_without_a_system_message_gets_its_default_one(model: str) -> None:
    assert TEMPLATES.render(model, [{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_deepseek_r1_distill() -> None:
    # The system prompt right after BOS, earlier reasoning dropped from assistant turns, and the
    # generation prompt opening a <think> block.
    assert TEMPLATES.render(DEEPSEEK, CONVERSATION) == (
        "<｜begin▁of▁sentence｜>You are terse."
        "<｜User｜>Hi"
        "<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
        "<｜User｜>2+2?"
        "<｜Assistant｜><think>\n"
    )


def test_deepseek_without_a_system_message() -> None:
    assert TEMPLATES.render(DEEPSEEK, [{"role": "user", "content": "Hi"}]) == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\n"
    )


def test_content_parts_reach_a_string_template_as_one_string() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Line one"}, {"type": "text", "text": "two"}]}
    ]
    assert TEMPLATES.render("Qwen2.5-7B-Instruct-AWQ", messages).endswith(
        "<|im_start|>user\nLine one\ntwo<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_vision_model_s_images_become_its_placeholder() -> None:
    chat = TEMPLATES.model("sim-llm")
    assert chat is not None and chat.vision and chat.image_placeholder == "<image>"
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]}]
    assert TEMPLATES.render("sim-llm", messages) == (
        "<|im_start|>user\nWhat is it?\n<image><|im_end|>\n<|im_start|>assistant\n"
    )
    assert TEMPLATES.model(DEEPSEEK) is not None and not TEMPLATES.model(DEEPSEEK).vision  # type: ignore[union-attr]


def test_chat_template_kwargs_reach_the_template(tmp_path: Path) -> None:
    (tmp_path / "thinker").mkdir()
    (tmp_path / "thinker" / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% if enable_thinking is defined and not enable_thinking %}"
        " <think></think>{% endif %}{% endif %}"
    )
    (tmp_path / "thinker" / "chat.json").write_text('{"special_tokens": {"bos_token": "<s>"}}')
    templates = ChatTemplates([str(tmp_path)])
    messages = [{"role": "user", "content": "Hi"}]
    assert templates.render("thinker", messages) == "<s>[user] Hi\n[assistant]"
    assert (
        templates.render("thinker", messages, enable_thinking=False)
        == "<s>[user] Hi\n[assistant] <think></think>"
    )


def test_a_template_that_trips_on_the_input_is_a_400(tmp_path: Path) -> None:
    (tmp_path / "strict").mkdir()
    (tmp_path / "strict" / "chat_template.jinja").write_text("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(InvalidInput, match="refused the request") as refused:
        ChatTemplates([str(tmp_path)]).render("strict", [{"role": "user", "content": "x"}])
    assert refused.value.status_code == 400
