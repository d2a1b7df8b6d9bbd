"""What the local `vllm` backend's two engines share: reading a request and building responses the
way Triton's vLLM backend does. Imported inside tritonserver's Python-backend stub only (it needs
`triton_python_backend_utils`), by `backend/vllm/model.py` and `backend/vllm/real_engine.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
RETURN_FLAGS = (
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
)


@dataclass(frozen=True)
class RequestInputs:
    prompt: str
    stream: bool
    prepend: str  # the prompt when the output must include it, else ""
    sampling_parameters: str  # the raw JSON
    flags: dict[str, bool]  # the return_* flags


def bool_input(request: Any, name: str) -> bool | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else bool(tensor.as_numpy().reshape(-1)[0])


def read_request(request: Any) -> RequestInputs:
    text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
    prompt = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    stream = bool(bool_input(request, "stream"))
    exclude = bool_input(request, "exclude_input_in_output")
    prepend = (not exclude) if exclude is not None else not stream
    if prepend and stream:
        raise ValueError("When streaming, `exclude_input_in_output` = False is not allowed.")
    tensor = pb_utils.get_input_tensor_by_name(request, "sampling_parameters")
    raw = tensor.as_numpy().reshape(-1)[0].decode("utf-8") if tensor is not None else request.parameters()
    flags = {name: bool(bool_input(request, name)) for name in RETURN_FLAGS}
    return RequestInputs(prompt, stream, prompt if prepend else "", raw, flags)


def output_response(
    flags: dict[str, bool],
    text: str,
    finish_reason: str | None,
    *,
    cumulative_logprob: float,
    num_input_tokens: int,
    num_output_tokens: int,
) -> Any:
    """One response, with the outputs the request's return_* flags ask for (create_response's)."""
    tensors = [pb_utils.Tensor("text_output", np.asarray([text.encode("utf-8")], np.object_))]
    if flags["return_finish_reason"]:
        tensors.append(pb_utils.Tensor("finish_reason", np.asarray([str(finish_reason)], np.object_)))
    if flags["return_cumulative_logprob"]:
        tensors.append(pb_utils.Tensor("cumulative_logprob", np.asarray([cumulative_logprob], np.float32)))
    if flags["return_logprobs"]:
        tensors.append(pb_utils.Tensor("logprobs", np.asarray([b"null"], np.object_)))
    if flags["return_num_input_tokens"]:
        # A 0-d scalar, like the real backend: clients see shape [].
        tensors.append(pb_utils.Tensor("num_input_tokens", np.asarray(num_input_tokens, np.uint32)))
    if flags["return_num_output_tokens"]:
        tensors.append(pb_utils.Tensor("num_output_tokens", np.asarray([num_output_tokens], np.uint32)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error_response(message: str) -> Any:
    # Like the real backend: the error plus a placeholder text_output.
    text = pb_utils.Tensor("text_output", np.asarray(["N/A"], dtype=np.object_))
    return pb_utils.InferenceResponse(output_tensors=[text], error=pb_utils.TritonError(message))


def cancelled_response() -> Any:
    error = pb_utils.TritonError(message="Request was cancelled", code=pb_utils.TritonError.CANCELLED)
    return pb_utils.InferenceResponse(error=error)
