"""triton_models/: every production folder parses, uses real vLLM engine arguments, and stays in range.

(That each folder also loads in a real tritonserver is checked in test_local_triton.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from gpuhost_testlib import TRITON_MODELS
from tritonclient.grpc import model_config_pb2

EXPECTED = {
    "DeepSeek-R1-Distill-Qwen-1.5B",
    "Qwen2.5-1.5B-Instruct-AWQ",
    "Qwen2.5-7B-Instruct-AWQ",
    "Qwen2.5-14B-Instruct-AWQ",
}
QUANTIZATIONS = {"awq", "awq_marlin", "gptq", "gptq_marlin", "bitsandbytes", "fp8", "squeezellm", "marlin"}
KV_CACHE_DTYPES = {"auto", "fp8", "fp8_e4m3", "fp8_e5m2"}
DTYPES = {"auto", "half", "float16", "bfloat16", "float", "float32"}


def known_engine_args() -> frozenset[str]:
    """vLLM's own AsyncEngineArgs where vllm is installed, else the project's list of real names."""
    try:
        import dataclasses

        from vllm.engine.arg_utils import AsyncEngineArgs  # type: ignore[import-not-found]

        return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))
    except ImportError:
        from localtriton.vllm_args import KNOWN_ENGINE_ARGS

        return KNOWN_ENGINE_ARGS


def folders() -> list[Path]:
    return sorted(p for p in TRITON_MODELS.iterdir() if p.is_dir())


def engine_args(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "1" / "model.json").read_text())
    return data


def test_the_seed_models_are_all_there() -> None:
    assert {p.name for p in folders()} == EXPECTED


@pytest.mark.parametrize("folder", folders(), ids=lambda p: p.name)
def test_config_pbtxt_is_a_vllm_model(folder: Path) -> None:
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "vllm"
    # A name, if given, must match the folder or Triton refuses the model.
    assert config.name in ("", folder.name)
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.KIND_MODEL)
    ]
    assert config.parameters["REPORT_CUSTOM_METRICS"].string_value == "true"
    # The backend adds its own inputs/outputs and the decoupled policy.
    assert not config.input and not config.output
    # The chat template (and its chat.json) are the platform's: Triton ignores them.
    assert sorted(p.name for p in folder.iterdir()) == [
        "1",
        "chat.json",
        "chat_template.jinja",
        "config.pbtxt",
    ]
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.json"]


@pytest.mark.parametrize("folder", folders(), ids=lambda p: p.name)
def test_model_json_uses_real_engine_args_in_range(folder: Path) -> None:
    args = engine_args(folder)
    unknown = set(args) - known_engine_args()
    assert not unknown, f"not vLLM engine arguments: {unknown}"
    assert isinstance(args["model"], str) and args["model"].count("/") == 1
    assert 0.1 <= args["gpu_memory_utilization"] <= 0.98
    assert 256 <= args["max_model_len"] <= 32768  # Qwen2.5 context is 32k
    assert 1 <= args["max_num_seqs"] <= 1024
    mbt = args.get("max_num_batched_tokens")
    if mbt is not None:
        assert mbt >= args["max_num_seqs"]
        # vLLM refuses a prompt longer than one step's budget unless prefill is chunked.
        assert args.get("enable_chunked_prefill") or mbt >= args["max_model_len"]
    assert args.get("quantization", "awq") in QUANTIZATIONS
    assert args.get("kv_cache_dtype", "auto") in KV_CACHE_DTYPES
    assert args.get("dtype", "auto") in DTYPES
    assert args.get("tensor_parallel_size", 1) == 1  # the yaml rents one GPU
    # The backend reports vllm:* metrics only while vLLM's stats logging is on.
    assert args.get("disable_log_stats", False) is False


def test_issue_values() -> None:
    deepseek = engine_args(TRITON_MODELS / "DeepSeek-R1-Distill-Qwen-1.5B")
    assert deepseek["model"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert (deepseek["max_model_len"], deepseek["max_num_batched_tokens"], deepseek["max_num_seqs"]) == (
        2048,
        2048,
        128,
    )
    assert deepseek["gpu_memory_utilization"] == 0.98

    small = engine_args(TRITON_MODELS / "Qwen2.5-1.5B-Instruct-AWQ")
    assert (small["quantization"], small["kv_cache_dtype"], small["max_num_seqs"]) == ("awq", "fp8", 6)

    seven = engine_args(TRITON_MODELS / "Qwen2.5-7B-Instruct-AWQ")
    assert seven["quantization"] == "awq"
    # Throughput: far more sequences per step than the latency-tuned model, chunked prefill.
    assert seven["max_num_seqs"] >= 128 and seven["enable_chunked_prefill"] is True

    fourteen = engine_args(TRITON_MODELS / "Qwen2.5-14B-Instruct-AWQ")
    assert fourteen["quantization"] in ("awq", "bitsandbytes")
    assert fourteen["model"].startswith("Qwen/Qwen2.5-14B-Instruct-AWQ")


@pytest.mark.parametrize("folder", folders(), ids=lambda p: p.name)
def test_a_folder_is_named_after_the_checkpoint_it_serves(folder: Path) -> None:
    # The folder is the model's name in the API: a quantized checkpoint says so in both.
    assert engine_args(folder)["model"].rsplit("/", 1)[-1] == folder.name
