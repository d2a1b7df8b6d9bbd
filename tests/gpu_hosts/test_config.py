"""vastai_instance_definition.yaml: the shipped defaults and a clear message for each bad field."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpuhost.config import ConfigError, docker_env, load, offer_query, parse, required_cuda
from gpuhost_testlib import NVIDIA_TRITON, TRITON_MODELS

SHIPPED = NVIDIA_TRITON / "vastai_instance_definition.yaml"


def shipped() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())
    return data


def test_shipped_defaults_are_sane() -> None:
    d = load(SHIPPED)
    assert d.offer.min_gpu_ram_gb >= 24
    assert d.offer.min_cuda_version >= required_cuda(d.instance.image) == 12.6
    assert d.instance.disk_gb >= 60  # image + model cache
    assert d.instance.ports == []  # Triton is reached through the ssh tunnel only
    assert d.instance.env["HF_HOME"].startswith("/workspace/")
    assert all((TRITON_MODELS / m / "config.pbtxt").is_file() for m in d.triton.models)
    # Comments are the documentation: every section explains itself.
    assert SHIPPED.read_text().count("#") > 20


def test_offer_query_and_env_string() -> None:
    d = load(SHIPPED)
    assert offer_query(d.offer, d.instance.disk_gb) == (
        "gpu_name in [RTX_4090,RTX_3090,RTX_A5000] num_gpus=1 gpu_ram>=24 cuda_vers>=12.6 disk_space>=80 "
        "reliability>=0.98 inet_down>=200 direct_port_count>=1 rentable=true dph<=1"
    )
    assert docker_env(d.instance, "hf_x") == "-e HF_TOKEN=hf_x -e HF_HOME=/workspace/hf"
    published = replace(d.instance, ports=[9000])
    assert docker_env(published, None) == "-p 9000:9000 -e HF_HOME=/workspace/hf"
    assert "HF_TOKEN" not in docker_env(d.instance, None)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("instance", "disk_gb", "lots", "instance.disk_gb: must be a number >= 20"),
        ("instance", "disk_gb", 10, "instance.disk_gb: must be a number >= 20 and <= 2000, got 10"),
        (
            "instance",
            "image",
            "nvcr.io/nvidia/tritonserver:24.12-py3",
            "instance.image: must be a Triton vLLM image",
        ),
        ("instance", "image", "nvcr.io/nvidia/tritonserver:24.05-vllm-python-py3", "is older than 24.12"),
        ("instance", "ports", [8000, 70000], "instance.ports: must be a list of TCP ports"),
        ("instance", "env", {"HF_TOKEN": "hf_abc"}, "instance.env: HF_TOKEN looks like a secret"),
        ("instance", "disk", 80, "instance.disk: unknown field"),
        ("offer", "min_cuda_version", 12.2, "offer.min_cuda_version: 12.2 is below CUDA 12.6"),
        ("offer", "min_reliability", 1.5, "offer.min_reliability: must be a number >= 0.0 and <= 1.0"),
        (
            "offer",
            "gpu_names",
            ["RTX 4090"],
            "offer.gpu_names: must be a non-empty list of Vast.ai GPU names",
        ),
        ("offer", "num_gpus", True, "offer.num_gpus: must be an integer"),
        ("offer", "order", "cheapest", "offer.order: must be 'price' or 'reliability'"),
        ("triton", "model_repository", "/root", "triton.model_repository: must be an absolute path"),
        ("triton", "models", [], "triton.models: must be a non-empty list"),
    ],
)
def test_bad_field_names_the_field(section: str, key: str, value: Any, message: str) -> None:
    data = copy.deepcopy(shipped())
    data[section][key] = value
    with pytest.raises(ConfigError) as err:
        parse(data, SHIPPED)
    assert message in str(err.value)
    assert str(err.value).startswith("vastai_instance_definition.yaml: ")


def test_missing_required_field_and_newer_image_cuda() -> None:
    data = shipped()
    del data["offer"]["min_gpu_ram_gb"]
    with pytest.raises(ConfigError, match=r"offer\.min_gpu_ram_gb: missing"):
        parse(data, SHIPPED)
    data = shipped()
    data["instance"]["image"] = "nvcr.io/nvidia/tritonserver:25.08-vllm-python-py3"
    with pytest.raises(ConfigError, match=r"below CUDA 13\.0"):
        parse(data, SHIPPED)
    data["offer"]["min_cuda_version"] = 13.0
    assert parse(data, SHIPPED).instance.image.endswith("25.08-vllm-python-py3")


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read instance definition"):
        load(tmp_path / "absent.yaml")
    bad = tmp_path / "x.yaml"
    bad.write_text("offer: [unclosed\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: not valid YAML"):
        load(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load(bad)
