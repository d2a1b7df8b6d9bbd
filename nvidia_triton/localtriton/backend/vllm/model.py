"""CPU implementation of Triton's vLLM backend (backend name ``vllm``): same inputs, outputs, behaviour.

Loaded by tritonserver's Python backend stub as ``<backend-dir>/vllm/model.py``. A model folder whose
``model.json`` names a simulated model (a hub id such as ``sim/sim-llm`` or ``Qwen/...``) is
simulated by :mod:`localtriton.engine` (deterministic text) and :mod:`localtriton.scheduler`
(batching with vLLM-shaped latency); nothing is downloaded. A folder whose ``model.json`` names a
real model (``${LLMQ_MODELS}/...`` or an absolute path: see ``localtriton.engine_env``) is served
by the real vLLM engine, ``real_engine.py`` next to this file, which needs the stub to run in the
engine virtualenv (the launcher arranges it).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

try:
    from localtriton import engine
except ImportError:  # stub interpreter without the project on sys.path: the launcher tells us where
    sys.path.insert(0, os.environ["LOCALTRITON_TOOLS_DIR"])
    from localtriton import engine
from localtriton import engine_env
from localtriton.backend_io import FINAL, cancelled_response, error_response, output_response, read_request
from localtriton.scheduler import BatchEngine, EngineStats, Sequence

_INPUTS: list[dict[str, Any]] = [
    {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]},
    {"name": "image", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
    *(
        {"name": name, "data_type": "TYPE_BOOL", "dims": [1], "optional": True}
        for name in (
            "stream",
            "exclude_input_in_output",
            "return_finish_reason",
            "return_cumulative_logprob",
            "return_logprobs",
            "return_num_input_tokens",
            "return_num_output_tokens",
        )
    ),
    {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
]
_OUTPUTS: list[dict[str, Any]] = [
    {"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "cumulative_logprob", "data_type": "TYPE_FP32", "dims": [-1]},
    {"name": "logprobs", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "num_input_tokens", "data_type": "TYPE_UINT32", "dims": [1]},
    {"name": "num_output_tokens", "data_type": "TYPE_UINT32", "dims": [-1]},
]


def _images(request: Any) -> list[bytes]:
    """The `image` input's images, decoded (base64, as the real backend takes them)."""
    tensor = pb_utils.get_input_tensor_by_name(request, "image")
    if tensor is None:
        return []
    return [base64.b64decode(item) for item in tensor.as_numpy().reshape(-1)]


class _ResponseSink:
    """Turns engine output into Triton responses exactly like vLLM backend's create_response."""

    def __init__(self, sender: Any, plan: engine.Plan, prepend: str, flags: dict[str, bool]) -> None:
        self.sender = sender
        self.plan = plan
        self.prepend = prepend
        self.flags = flags

    def is_cancelled(self) -> bool:
        return bool(self.sender.is_cancelled())

    def send(self, delta: str, n_new: int, n_total: int, finish_reason: str | None) -> None:
        response = output_response(
            self.flags,
            self.prepend + delta,
            finish_reason,
            cumulative_logprob=float(sum(self.plan.token_logprobs[:n_total])),
            num_input_tokens=self.plan.prompt_tokens,
            num_output_tokens=n_new,
        )
        self.prepend = ""
        self.sender.send(response, flags=FINAL if finish_reason else 0)

    def cancelled(self) -> None:
        self.sender.send(cancelled_response(), flags=FINAL)


class _Metrics:
    """Prometheus metrics, touched only from the engine thread (see scheduler module doc)."""

    def __init__(self, model: str, version: str, vllm_metrics: bool) -> None:
        # Families must outlive their metrics, or set()/increment() fail: keep references.
        self._families: list[Any] = []

        def family(name: str, doc: str, kind: Any, labels: dict[str, str]) -> Any:
            self._families.append(pb_utils.MetricFamily(name=name, description=doc, kind=kind))
            return self._families[-1].Metric(labels=labels)

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        sim = {"model": model}
        self.running = family("sim_engine_running_requests", "Sequences running now", gauge, sim)
        self.peak = family("sim_engine_peak_running_requests", "Most sequences running at once", gauge, sim)
        self.requests = family("sim_engine_requests_total", "Requests received by the engine", counter, sim)
        self.cancelled = family("sim_engine_cancelled_total", "Sequences dropped on cancel", counter, sim)
        # When, on this machine's CLOCK_MONOTONIC: a benchmark on the same machine times an abort
        # exactly, without scraping the metrics in a tight loop while it waits.
        self.last_cancel = family(
            "sim_engine_last_cancel_monotonic_seconds", "CLOCK_MONOTONIC time of the latest drop", gauge, sim
        )
        self.vllm: tuple[Any, Any, Any] | None = None
        if vllm_metrics:
            labels = {"model": model, "version": version}
            self.vllm = (
                family("vllm:prompt_tokens_total", "Number of prefill tokens processed.", counter, labels),
                family(
                    "vllm:generation_tokens_total", "Number of generation tokens processed.", counter, labels
                ),
                family("vllm:num_requests_running", "Number of requests currently running.", gauge, labels),
            )
        self._last = EngineStats()

    def update(self, s: EngineStats) -> None:
        last = self._last
        self.running.set(s.running)
        self.peak.set(s.peak_running)
        if s.received > last.received:
            self.requests.increment(s.received - last.received)
        if s.cancelled > last.cancelled:
            self.cancelled.increment(s.cancelled - last.cancelled)
            self.last_cancel.set(s.last_cancel_at)
        if self.vllm is not None:
            prompt, generation, running = self.vllm
            if s.prompt_tokens > last.prompt_tokens:
                prompt.increment(s.prompt_tokens - last.prompt_tokens)
            if s.generation_tokens > last.generation_tokens:
                generation.increment(s.generation_tokens - last.generation_tokens)
            running.set(s.running)
        self._last = EngineStats(**vars(s))

    def close(self) -> None:
        """Drop metrics before their families, the order tritonserver requires."""
        del self.running, self.peak, self.requests, self.cancelled, self.last_cancel, self.vllm
        self._families.clear()


class TritonPythonModel:
    @classmethod
    def auto_complete_config(cls, auto_complete_model_config: Any) -> Any:
        config = auto_complete_model_config.as_dict()
        have_in = {i["name"] for i in config["input"]}
        have_out = {o["name"] for o in config["output"]}
        for spec in _INPUTS:
            if spec["name"] not in have_in:
                auto_complete_model_config.add_input(spec)
        for spec in _OUTPUTS:
            if spec["name"] not in have_out:
                auto_complete_model_config.add_output(spec)
        # Decoupled so many requests stay in flight; the engine batches them, not Triton.
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        auto_complete_model_config.set_max_batch_size(0)
        return auto_complete_model_config

    def initialize(self, args: dict[str, str]) -> None:
        self.model_config: dict[str, Any] = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise ValueError(
                "vLLM Triton backend must be configured to use decoupled model transaction policy"
            )
        model_dir = Path(pb_utils.get_model_dir())
        self.real: Any = None
        raw_args = _read_model_json(model_dir / "model.json")
        if raw_args is not None and engine_env.is_real_model(raw_args):
            weights = engine_env.resolve_model_path(str(raw_args["model"]))
            if not (weights / "config.json").is_file():
                raise FileNotFoundError(
                    f"{self.model_name}: no prepared model in {weights}: {engine_env.INSTALL_HINT}"
                )
            self.real = _load_real_engine().RealVllmModel(
                model_name=self.model_name,
                model_version=args["model_version"],
                model_config=self.model_config,
                engine_args=raw_args,
                weights=str(weights),
            )
            return
        self.config = engine.load_engine_config(model_dir / "model.json")
        prefill_ms = self._latency("SIM_PREFILL_MS")
        decode_ms = self._latency("SIM_DECODE_MS")
        vllm_metrics = (
            self._param("REPORT_CUSTOM_METRICS").lower() == "true" and not self.config.disable_log_stats
        )
        self.metrics = _Metrics(self.model_name, args["model_version"], vllm_metrics)
        self.engine = BatchEngine(
            prefill_ms=prefill_ms,
            decode_ms=decode_ms,
            max_num_seqs=self.config.max_num_seqs,
            on_stats=self.metrics.update,
            name=f"sim-engine-{self.model_name}",
        )
        self.engine.start()
        pb_utils.Logger.log_info(
            f"[sim-vllm] {self.model_name}: simulating {self.config.args.get('model')!r} "
            f"max_model_len={self.config.max_model_len} max_num_seqs={self.config.max_num_seqs} "
            f"prefill_ms={prefill_ms} decode_ms={decode_ms}"
        )

    def _param(self, name: str) -> str:
        value = self.model_config.get("parameters", {}).get(name, {}).get("string_value", "")
        return str(value)

    def _latency(self, name: str) -> float:
        # The launcher's override (environment) wins over config.pbtxt.
        raw = os.environ.get(name) or self._param(name) or "0"
        return float(raw)

    def execute(self, requests: list[Any]) -> None:
        if self.real is not None:
            self.real.execute(requests)
            return None  # decoupled: the engine's loop thread sends the responses
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(self._sequence(request, sender))
            except Exception as exc:
                sender.send(error_response(f"Error generating stream: {exc}"), flags=FINAL)
        return None  # decoupled: the engine thread sends the responses

    def _sequence(self, request: Any, sender: Any) -> Sequence:
        inputs = read_request(request)
        params = engine.parse_sampling_params(inputs.sampling_parameters)
        if params.lora_name is not None:
            raise ValueError("LoRA feature is not enabled.")
        images = engine.image_tokens(_images(request))
        plan = engine.plan(inputs.prompt, params, self.config.max_model_len, images)
        return Sequence(plan, _ResponseSink(sender, plan, inputs.prepend, inputs.flags), inputs.stream)

    def finalize(self) -> None:
        if self.real is not None:
            self.real.finalize()
            return
        self.engine.stop()
        self.metrics.close()


def _read_model_json(path: Path) -> dict[str, Any] | None:
    """The raw engine args, or None when unreadable (load_engine_config then reports why)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _load_real_engine() -> Any:
    """``real_engine.py`` from this file's folder (imported only for real models: it needs vLLM)."""
    path = Path(__file__).with_name("real_engine.py")
    spec = importlib.util.spec_from_file_location("localtriton_real_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
