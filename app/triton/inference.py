"""Generation through Triton's vLLM backend over the gRPC streaming API.

The vLLM model is decoupled, so plain infer is refused; each request gets its own
bidirectional stream on one shared channel, which lets many requests be in flight at once
and lets a single one be cancelled (cancelling the stream aborts it in vLLM).

Not one stream for all requests: tritonserver 2.51 aborts when a request it refuses early (unknown
or unloading model) is answered on a stream that is writing another response.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

# gRPC codes worth retrying: the server is down, overloaded, or a model is (re)loading. Not
# DEADLINE_EXCEEDED: the whole request outlived TRITON_REQUEST_TIMEOUT_S, and would again.
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
_TRANSIENT_MARKERS = (
    "is not ready",
    "has no available versions",  # known to the repository, still loading (e.g. Triton restarting)
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


class Aborted(Exception):
    """The generation was stopped on our side (cancel, deadline); `partial` is what it had produced."""

    def __init__(self, partial: Generation) -> None:
        super().__init__("generation aborted")
        self.partial = partial


# Called with each new piece of text of a streamed generation, on the event loop (must not block).
OnText = Callable[[str], None]


def classify_rpc_error(exc: grpc.RpcError) -> GenerationError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    transient = code in _TRANSIENT_CODES
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GenerationError(
            f"the generation did not end within TRITON_REQUEST_TIMEOUT_S (Triton gRPC error {name}: "
            f"{details}); not tried again, it would take as long: a longer job needs a larger "
            "TRITON_REQUEST_TIMEOUT_S or a smaller max_tokens",
            transient=False,
        )
    return GenerationError(f"Triton gRPC error {name}: {details}", transient=transient)


# Triton's vLLM backend puts this before every error it sends, streamed request or not: it says
# nothing to the job's owner.
_BACKEND_PREFIX = "Error generating stream: "


def classify_server_message(message: str) -> GenerationError:
    message = message.removeprefix(_BACKEND_PREFIX)
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


# ---------------------------------------------------------------- request and response tensors
# Triton's raw tensor encoding: a BYTES element is a 4-byte little-endian length and the bytes, a
# BOOL one byte, integers little-endian.

_TRUE = b"\x01"
_FALSE = b"\x00"
_INPUT_TENSORS = tuple(
    service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1])
    for name, datatype in (
        ("text_input", "BYTES"),
        ("stream", "BOOL"),
        ("sampling_parameters", "BYTES"),
        ("exclude_input_in_output", "BOOL"),
        ("return_finish_reason", "BOOL"),
        ("return_num_input_tokens", "BOOL"),
        ("return_num_output_tokens", "BOOL"),
    )
)
_INT_TYPES = {
    "UINT8": (1, False),
    "INT8": (1, True),
    "UINT16": (2, False),
    "INT16": (2, True),
    "UINT32": (4, False),
    "INT32": (4, True),
    "UINT64": (8, False),
    "INT64": (8, True),
}


def _bytes_element(value: bytes) -> bytes:
    return len(value).to_bytes(4, "little") + value


def build_request(
    model: str, prompt: str, sampling_parameters: dict[str, Any], request_id: str, *, stream: bool = False
) -> Any:
    """The ModelInferRequest for one generation (inputs in `_INPUT_TENSORS` order); streamed, the
    backend answers one response per engine step with the new text only.

    Built directly rather than through tritonclient's numpy-based InferInput: that was ~8 % of the
    worker's CPU per job (py-spy)."""
    images = sampling_parameters.get("image")
    if (
        images
    ):  # a vision job's images (base64) go to the backend's `image` input, not to vLLM's SamplingParams
        sampling_parameters = {k: v for k, v in sampling_parameters.items() if k != "image"}
    request = service_pb2.ModelInferRequest(
        model_name=model,
        id=request_id,
        inputs=_INPUT_TENSORS,
        raw_input_contents=[
            _bytes_element(prompt.encode("utf-8")),
            _TRUE if stream else _FALSE,
            _bytes_element(json.dumps(sampling_parameters).encode("utf-8")),
            _TRUE,  # exclude_input_in_output
            _TRUE,  # return_finish_reason
            _TRUE,  # return_num_input_tokens
            _TRUE,  # return_num_output_tokens
        ],
    )
    if images:
        request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
        request.raw_input_contents.append(b"".join(_bytes_element(str(i).encode("ascii")) for i in images))
    return request


def _first_str(raw: bytes) -> str | None:
    """The first element of a raw BYTES tensor (None when it has none)."""
    if len(raw) < 4:
        return None
    size = int.from_bytes(raw[:4], "little")
    # NUL as U+FFFD, like undecodable bytes: Postgres text cannot store it, and a stream's pieces
    # must add up to the stored output.
    return raw[4 : 4 + size].decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def _int_sum(datatype: str, raw: bytes) -> int | None:
    """The sum of a raw integer tensor's elements (None when it has none or is not an integer type)."""
    spec = _INT_TYPES.get(datatype)
    if spec is None or not raw:
        return None
    width, signed = spec
    if len(raw) == width:
        return int.from_bytes(raw, "little", signed=signed)
    return sum(int.from_bytes(raw[i : i + width], "little", signed=signed) for i in range(0, len(raw), width))


class _Responses:
    """The responses of one request, accumulated (text pieces, summed counts)."""

    __slots__ = ("completion_tokens", "finish_reason", "on_text", "pieces", "prompt_tokens", "saw_counts")

    def __init__(self, on_text: OnText | None = None) -> None:
        self.on_text = on_text
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens = 0
        self.saw_counts = False

    def add(self, response: Any) -> bool:
        """Take one ModelInferResponse; True when it is the last one for this request."""
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=False):
            name = output.name
            if name == "text_output":
                text = _first_str(raw)
                if text:
                    self.pieces.append(text)
                    if self.on_text is not None:
                        self.on_text(text)
            elif name == "finish_reason":
                reason = _first_str(raw)
                if reason is not None and reason != "None":
                    self.finish_reason = reason
            elif name == "num_input_tokens":
                n_in = _int_sum(output.datatype, raw)
                if n_in is not None:
                    self.prompt_tokens = n_in
            elif name == "num_output_tokens":
                n_out = _int_sum(output.datatype, raw)
                if n_out is not None:
                    self.completion_tokens += n_out
                    self.saw_counts = True
        params = response.parameters
        if "triton_final_response" in params and params["triton_final_response"].bool_param:
            return True
        # A backend that flags the end with a separate empty response (not delivered unless asked
        # for) still sets a finish reason on its last real one.
        return self.finish_reason is not None

    def generation(self) -> Generation:
        return Generation(
            text="".join(self.pieces),
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens if self.saw_counts else None,
        )


class TritonInference:
    """One per event loop: owns the gRPC channel; each request gets its own stream on it."""

    def __init__(self, grpc_url: str, *, connect_timeout_s: float, request_timeout_s: float) -> None:
        self.grpc_url = grpc_url
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self._channel: Any = grpc.aio.insecure_channel(grpc_url, options=_channel_args())
        self._stub: Any = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _wait_connected(self) -> None:
        # gRPC has no connect timeout of its own; without one an unreachable host would only fail
        # at the (long) request deadline.
        if self._channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout=self.connect_timeout_s)
        except TimeoutError as exc:
            raise GenerationError(
                f"Triton at {self.grpc_url} is unreachable (no gRPC connection within {self.connect_timeout_s:g}s)",
                transient=True,
            ) from exc

    async def generate(
        self,
        model: str,
        prompt: str,
        sampling_parameters: dict[str, Any],
        request_id: str,
        *,
        on_text: OnText | None = None,
    ) -> Generation:
        """The whole generation. With `on_text` it is streamed: each new piece goes to `on_text` as it
        comes. Cancelled (our task), the request is aborted in the engine and `Aborted` carries the
        text received so far (nothing when not streamed)."""
        await self._wait_connected()
        call = self._stub.ModelStreamInfer(timeout=self.request_timeout_s)
        responses = _Responses(on_text)
        saw_final = False
        failure: GenerationError | None = None
        try:
            # One request, then half-close: the server ends the stream after the final response.
            # (Cancelling instead is for giving up: tritonserver 2.51 handles many cancelled
            # streams badly at shutdown, holding the model until its exit timeout.)
            await call.write(
                build_request(model, prompt, sampling_parameters, request_id, stream=on_text is not None)
            )
            await call.done_writing()
            async for message in call:
                if message.error_message:
                    failure = failure or classify_server_message(message.error_message)
                    continue
                saw_final = responses.add(message.infer_response) or saw_final
        except grpc.RpcError as exc:
            raise classify_rpc_error(exc) from exc
        except asyncio.CancelledError:
            call.cancel()  # aborts the request in vLLM
            raise Aborted(responses.generation()) from None
        except BaseException:
            call.cancel()
            raise
        if failure is not None:
            raise failure
        if not saw_final:
            raise GenerationError("Triton closed the stream before the final response", transient=True)
        return responses.generation()
