"""Load and validate vastai_instance_definition.yaml.

Every field is checked by hand (no pydantic here) so an error names the exact field in the
yaml's own dotted spelling, e.g. ``instance.disk_gb: must be a number >= 20, got 'lots'``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "vastai_instance_definition.yaml"

# The oldest Triton release whose vLLM backend returns the token counts the platform reads.
MIN_IMAGE_RELEASE = (24, 12)
_IMAGE_RE = re.compile(r"^nvcr\.io/nvidia/tritonserver:(\d{2})\.(\d{2})-vllm-python-py3$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
_SECRET_ENV_RE = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY", re.IGNORECASE)


class ConfigError(ValueError):
    """A field of the instance definition is missing or wrong; the message names it."""


@dataclass(frozen=True)
class OfferFilter:
    gpu_names: list[str]
    num_gpus: int
    min_gpu_ram_gb: float
    min_cuda_version: float
    min_reliability: float
    min_inet_down_mbps: float
    min_direct_ports: int
    max_price_per_hour: float | None
    order: str
    limit: int


@dataclass(frozen=True)
class InstanceSpec:
    image: str
    disk_gb: float
    label: str
    ports: list[int]
    env: dict[str, str]
    hf_token_env: str
    onstart: str
    wait_timeout_s: float
    poll_interval_s: float


@dataclass(frozen=True)
class TritonSpec:
    model_repository: str
    log_file: str
    models: list[str]


@dataclass(frozen=True)
class InstanceDefinition:
    offer: OfferFilter
    instance: InstanceSpec
    triton: TritonSpec
    source: Path = field(default=DEFAULT_CONFIG)


def required_cuda(image: str) -> float:
    """CUDA version an image's release needs from the host driver (see VASTAI_NOTES)."""
    match = _IMAGE_RE.match(image)
    if not match:
        return 0.0
    release = (int(match[1]), int(match[2]))
    if release >= (25, 8):
        return 13.0
    if release >= (25, 4):
        return 12.9
    return 12.6


class _Section:
    """Reads one mapping of the yaml, remembering which keys were used."""

    def __init__(self, data: Any, name: str, source: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source.name}: {name}: must be a mapping, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.name = name
        self.source = source
        self.used: set[str] = set()

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source.name}: {self.name}.{key}: {why}")

    def get(self, key: str, check: Callable[[Any], bool], expect: str, default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self.fail(key, f"missing (expected {expect})")
            return default
        value = self.data[key]
        # bool is an int in Python; never accept it where a number is meant.
        if isinstance(value, bool) and "true/false" not in expect:
            raise self.fail(key, f"must be {expect}, got {value!r}")
        if not check(value):
            raise self.fail(key, f"must be {expect}, got {value!r}")
        return value

    def number(self, key: str, lo: float, hi: float | None = None, default: Any = ...) -> float:
        expect = f"a number >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        value = self.get(
            key,
            lambda v: isinstance(v, int | float) and v >= lo and (hi is None or v <= hi),
            expect,
            default,
        )
        return float(value)

    def integer(self, key: str, lo: int, hi: int | None = None, default: Any = ...) -> int:
        expect = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        return int(
            self.get(
                key, lambda v: isinstance(v, int) and v >= lo and (hi is None or v <= hi), expect, default
            )
        )

    def text(self, key: str, default: Any = ...) -> str:
        return str(
            self.get(key, lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string", default)
        )

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(unknown[0], f"unknown field (known: {', '.join(sorted(self.used))})")


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def parse(data: Any, source: Path = DEFAULT_CONFIG) -> InstanceDefinition:
    """Validate an already-parsed yaml document."""
    top = _Section(data, "(top level)", source)
    offer_s = _Section(top.get("offer", lambda v: True, "a mapping"), "offer", source)
    inst_s = _Section(top.get("instance", lambda v: True, "a mapping"), "instance", source)
    triton_s = _Section(top.get("triton", lambda v: True, "a mapping"), "triton", source)
    top.finish()

    gpu_names = offer_s.get(
        "gpu_names",
        lambda v: _str_list(v) and all(_NAME_RE.match(n) for n in v),
        "a non-empty list of Vast.ai GPU names with '_' for spaces (e.g. [RTX_4090])",
    )
    max_price = offer_s.get(
        "max_price_per_hour",
        lambda v: v is None or (isinstance(v, int | float) and v > 0),
        "null or > 0",
        None,
    )
    offer = OfferFilter(
        gpu_names=list(gpu_names),
        num_gpus=offer_s.integer("num_gpus", 1, 8, default=1),
        min_gpu_ram_gb=offer_s.number("min_gpu_ram_gb", 8, 200),
        min_cuda_version=offer_s.number("min_cuda_version", 11.0, 20.0),
        min_reliability=offer_s.number("min_reliability", 0.0, 1.0, default=0.98),
        min_inet_down_mbps=offer_s.number("min_inet_down_mbps", 0, default=100),
        min_direct_ports=offer_s.integer("min_direct_ports", 0, 64, default=4),
        max_price_per_hour=None if max_price is None else float(max_price),
        order=offer_s.get(
            "order", lambda v: v in ("price", "reliability"), "'price' or 'reliability'", "price"
        ),
        limit=offer_s.integer("limit", 1, 100, default=10),
    )
    offer_s.finish()

    image = inst_s.get(
        "image",
        lambda v: isinstance(v, str) and bool(_IMAGE_RE.match(v)),
        "a Triton vLLM image like nvcr.io/nvidia/tritonserver:24.12-vllm-python-py3",
    )
    match = _IMAGE_RE.match(image)
    assert match is not None
    if (int(match[1]), int(match[2])) < MIN_IMAGE_RELEASE:
        raise inst_s.fail(
            "image",
            f"{image} is older than 24.12, the first release returning the token counts the platform uses",
        )
    env = inst_s.get(
        "env",
        lambda v: (
            isinstance(v, dict)
            and all(
                isinstance(k, str)
                and _NAME_RE.match(k)
                and isinstance(x, str | int | float)
                and not re.search(r"\s", str(x))
                for k, x in v.items()
            )
        ),
        "a mapping of NAME: value without spaces",
        {},
    )
    secret_keys = [k for k in env if _SECRET_ENV_RE.search(k)]
    if secret_keys:
        raise inst_s.fail(
            "env",
            f"{secret_keys[0]} looks like a secret: keep it out of the yaml "
            "(the HF token is read from the variable named by instance.hf_token_env)",
        )
    ports = inst_s.get(
        "ports",
        lambda v: isinstance(v, list) and all(isinstance(p, int) and 0 < p < 65536 for p in v),
        "a list of TCP ports (1-65535)",
        [],
    )
    instance = InstanceSpec(
        image=image,
        disk_gb=inst_s.number("disk_gb", 20, 2000),
        label=inst_s.get(
            "label",
            lambda v: isinstance(v, str) and bool(re.match(r"^[\w.-]+$", v)),
            "a word",
            "llm-jobqueue-triton",
        ),
        ports=[int(p) for p in ports],
        env={k: str(v) for k, v in env.items()},
        hf_token_env=inst_s.get(
            "hf_token_env",
            lambda v: isinstance(v, str) and bool(_NAME_RE.match(v)),
            "a variable name",
            "HF_TOKEN",
        ),
        onstart=inst_s.text("onstart", default=""),
        wait_timeout_s=inst_s.number("wait_timeout_s", 1, 7200, default=900),
        poll_interval_s=inst_s.number("poll_interval_s", 0, 300, default=10),
    )
    inst_s.finish()

    need = required_cuda(image)
    if offer.min_cuda_version < need:
        raise offer_s.fail(
            "min_cuda_version",
            f"{offer.min_cuda_version} is below CUDA {need} that {image} needs: hosts with older drivers "
            "cannot start it",
        )

    triton = TritonSpec(
        model_repository=triton_s.get(
            "model_repository",
            lambda v: isinstance(v, str) and v.startswith("/") and v.rstrip("/") not in ("", "/root"),
            "an absolute path on the instance other than / or /root",
            "/workspace/triton_models",
        ),
        log_file=triton_s.get(
            "log_file",
            lambda v: isinstance(v, str) and v.startswith("/"),
            "an absolute path",
            "/workspace/triton.log",
        ),
        models=list(triton_s.get("models", _str_list, "a non-empty list of folder names in triton_models/")),
    )
    triton_s.finish()
    return InstanceDefinition(offer=offer, instance=instance, triton=triton, source=source)


def load(path: Path = DEFAULT_CONFIG) -> InstanceDefinition:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read instance definition {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from None
    return parse(data, path)


def missing_model_folder(models_dir: Path, names: list[str]) -> str | None:
    """Why one of names has no Triton model folder under models_dir, naming the folders there."""
    missing = [n for n in names if not (models_dir / n / "config.pbtxt").is_file()]
    if not missing:
        return None
    try:
        known = sorted(p.name for p in models_dir.iterdir() if (p / "config.pbtxt").is_file())
    except OSError:
        return f"no model folder {missing[0]!r}: cannot read {models_dir}"
    return f"no model folder {missing[0]!r} in {models_dir} (have: {', '.join(known) or 'none'})"


def offer_query(offer: OfferFilter, disk_gb: float) -> str:
    """The `vastai search offers` query string for these filters."""
    parts = [
        f"gpu_name in [{','.join(offer.gpu_names)}]",
        f"num_gpus={offer.num_gpus}",
        f"gpu_ram>={offer.min_gpu_ram_gb:g}",
        f"cuda_vers>={offer.min_cuda_version:g}",
        f"disk_space>={disk_gb:g}",
        f"reliability>={offer.min_reliability:g}",
        f"inet_down>={offer.min_inet_down_mbps:g}",
        f"direct_port_count>={offer.min_direct_ports}",
        "rentable=true",
    ]
    if offer.max_price_per_hour is not None:
        parts.append(f"dph<={offer.max_price_per_hour:g}")
    return " ".join(parts)


def offer_order(offer: OfferFilter) -> str:
    return "dph+" if offer.order == "price" else "reliability-,dph+"


def docker_env(spec: InstanceSpec, hf_token: str | None) -> str:
    """The single `--env` string of `vastai create instance` (repeating --env keeps only the last)."""
    parts = [f"-p {p}:{p}" for p in spec.ports]
    if hf_token:
        parts.append(f"-e {spec.hf_token_env}={hf_token}")
        # vLLM and huggingface_hub read HF_TOKEN whatever the local variable was called.
        if spec.hf_token_env != "HF_TOKEN":
            parts.append(f"-e HF_TOKEN={hf_token}")
    parts += [f"-e {k}={v}" for k, v in spec.env.items()]
    return " ".join(parts)
