"""Fixtures: one real tritonserver (started by LocalTriton) for the whole session."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from localtriton.launcher import BUILTIN_REPOSITORY, LocalTriton

PROD_MODEL_JSON = {
    "model": "Qwen/Qwen2.5-7B-Instruct-AWQ",
    "quantization": "awq",
    "kv_cache_dtype": "fp8",
    "gpu_memory_utilization": 0.9,
    "max_model_len": 4096,
    "max_num_seqs": 64,
    "max_num_batched_tokens": 4096,
    "enforce_eager": False,
    "enable_prefix_caching": True,
    "disable_log_requests": True,
    "tensor_parallel_size": 1,
}
SIM_CONFIG = (BUILTIN_REPOSITORY / "sim-llm" / "config.pbtxt").read_text()
SERVED = ["sim-llm", "sim-llm-slow", "sim-prod"]


def add_model(repo: Path, name: str, model_json: dict[str, Any]) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(SIM_CONFIG)
    (repo / name / "1" / "model.json").write_text(json.dumps(model_json))


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in sim models + a prod-style model.json + one with an unknown engine arg (not loaded)."""
    path = tmp_path_factory.mktemp("repo")
    for name in ("sim-llm", "sim-llm-slow"):
        shutil.copytree(BUILTIN_REPOSITORY / name, path / name)
    add_model(path, "sim-prod", PROD_MODEL_JSON)
    add_model(path, "sim-bad-args", {"model": "sim/bad", "not_a_vllm_arg": 1})
    return path


@pytest.fixture(scope="session")
def triton(repo: Path) -> Iterator[LocalTriton]:
    log = repo.parent / "tritonserver.log"  # kept after the run for debugging
    with LocalTriton(model_repository=repo, models=SERVED, log_file=log) as server:
        yield server


@pytest.fixture
def http(triton: LocalTriton) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=triton.http_url, timeout=30) as client:
        yield client
