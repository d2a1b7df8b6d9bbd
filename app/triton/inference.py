"""Generation through Triton's vLLM backend over the gRPC streaming API.

The vLLM model is decoupled, so plain infer is refused; each request gets its own
bidirectional stream on one shared channel, which lets many requests be in flight at once
and lets a single one be cancelled (cancelling the stream aborts it in vLLM).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

# gRPC codes worth retrying: the server is down, overloaded, or a model is (re)loading.
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)
_TRANSIENT_MARKERS = (
    "is not ready",
    "unavailable",
    "connection refused",
    "failed to connect",
    "socket closed",
)


class GenerationError(Exception):
    """A failed generation; `transient` says whether trying again may help."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


def _bool_input(name: str, value: bool) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def _string_input(name: str, value: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
    return tensor


def build_inputs(prompt: str, sampling_parameters: dict[str, Any]) -> list[grpcclient.InferInput]:
    return [
        _string_input("text_input", prompt),
        _bool_input("stream", False),
        _string_input("sampling_parameters", json.dumps(sampling_parameters)),
        _bool_input("exclude_input_in_output", True),
        _bool_input("return_finish_reason", True),
        _bool_input("return_num_input_tokens", True),
        _bool_input("return_num_output_tokens", True),
    ]


def _first_str(result: Any, name: str) -> str | None:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _int_sum(result: Any, name: str) -> int | None:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    return int(np.asarray(array).sum())


def _is_final(result: Any) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and bool(params["triton_final_response"].bool_param)


def classify_rpc_error(exc: grpc.RpcError) -> GenerationError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    transient = code in _TRANSIENT_CODES
    name = code.name if code is not None else "UNKNOWN"
    return GenerationError(f"Triton gRPC error {name}: {details}", transient=transient)


def classify_server_message(message: str) -> GenerationError:
    lowered = message.lower()
    return GenerationError(message, transient=any(marker in lowered for marker in _TRANSIENT_MARKERS))


def _channel_args() -> list[tuple[str, int]]:
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        # gRPC's reconnect backoff grows to 2 minutes by default: a Triton that comes back
        # (restart, tunnel re-opened) would sit unused long after it is up again.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]


class TritonInference:
    """One per event loop: owns the gRPC channel."""

    def __init__(self, grpc_url: str, *, connect_timeout_s: float, request_timeout_s: float) -> None:
        self.grpc_url = grpc_url
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self._client = grpcclient.InferenceServerClient(url=grpc_url, channel_args=_channel_args())

    async def close(self) -> None:
        await self._client.close()

    async def _wait_connected(self) -> None:
        # tritonclient exposes no connect timeout; without one an unreachable host would only
        # fail at the (long) request deadline.
        channel = getattr(self._client, "_channel", None)
        if channel is None:
            return
        if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=self.connect_timeout_s)
        except TimeoutError as exc:
            raise GenerationError(
                f"Triton at {self.grpc_url} is unreachable (no gRPC connection within {self.connect_timeout_s:g}s)",
                transient=True,
            ) from exc

    async def generate(
        self, model: str, prompt: str, sampling_parameters: dict[str, Any], request_id: str
    ) -> Generation:
        await self._wait_connected()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            # One request, then half-close: the server ends the stream after the final response.
            # (Breaking out early instead cancels the call, which tritonserver 2.51 handles badly
            # with many streams open: it holds the model at shutdown until its exit timeout.)
            yield {
                "model_name": model,
                "inputs": build_inputs(prompt, sampling_parameters),
                "request_id": request_id,
            }

        responses = self._client.stream_infer(
            inputs_iterator=requests(), stream_timeout=self.request_timeout_s
        )
        pieces: list[str] = []
        finish_reason: str | None = None
        prompt_tokens: int | None = None
        completion_tokens = 0
        saw_counts = False
        saw_final = False
        failure: GenerationError | None = None
        try:
            async for result, error in responses:
                if error is not None:
                    failure = failure or classify_server_message(
                        str(error.message() if hasattr(error, "message") else error)
                    )
                    continue
                text = _first_str(result, "text_output")
                if text:
                    pieces.append(text)
                reason = _first_str(result, "finish_reason")
                if reason is not None and reason != "None":
                    finish_reason = reason
                n_in = _int_sum(result, "num_input_tokens")
                if n_in is not None:
                    prompt_tokens = n_in
                n_out = _int_sum(result, "num_output_tokens")
                if n_out is not None:
                    completion_tokens += n_out
                    saw_counts = True
                saw_final = saw_final or _is_final(result) or finish_reason is not None
        except grpc.RpcError as exc:
            raise classify_rpc_error(exc) from exc
        except InferenceServerException as exc:
            raise classify_server_message(str(exc.message())) from exc
        except BaseException:
            responses.cancel()  # aborts the request in vLLM (e.g. our task was cancelled)
            raise
        if failure is not None:
            raise failure
        if not saw_final:
            raise GenerationError("Triton closed the stream before the final response", transient=True)
        return Generation(
            text="".join(pieces),
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens if saw_counts else None,
        )
