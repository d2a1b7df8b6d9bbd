"""Unit tests of pure logic (no services)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import grpc
import pytest
from pydantic import ValidationError

from app.config import Settings
from app.errors import InvalidInput
from app.pagination import decode_cursor, encode_cursor
from app.triton.inference import classify_rpc_error, classify_server_message
from worker.jobs import backoff_s, sampling_parameters


def test_production_refuses_the_development_password() -> None:
    with pytest.raises(ValidationError, match="development password"):
        Settings(APP_ENV="production", DATABASE_URL="postgresql+psycopg://postgres:postgres@db/llmq")
    with pytest.raises(ValidationError, match="development password"):
        Settings(APP_ENV="production", DATABASE_URL="postgresql+psycopg://app:changeme@db/llmq")
    ok = Settings(APP_ENV="production", DATABASE_URL="postgresql+psycopg://app:s3cr3t-Long@db/llmq")
    assert ok.APP_ENV == "production"
    assert Settings(APP_ENV="development", DATABASE_URL="postgresql+psycopg://postgres:postgres@db/x")


def test_settings_validate_bounds() -> None:
    with pytest.raises(ValidationError, match="WORKER_IN_FLIGHT"):
        Settings(WORKER_IN_FLIGHT=0)


def test_cursor_round_trip_and_garbage() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    row = uuid.uuid4()
    assert decode_cursor(encode_cursor(when, row)) == (when, row)
    for bad in ("", "!!!", "aGVsbG8", encode_cursor(when, row)[:-4]):
        with pytest.raises(InvalidInput):
            decode_cursor(bad)


def test_backoff_grows_exponentially_with_jitter_and_a_ceiling() -> None:
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)]:
        delays = [backoff_s(attempt, 1.0, 30.0) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, not a fixed schedule


def test_sampling_parameters_forward_only_what_was_set() -> None:
    params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None, "other": 1}
    assert sampling_parameters(params) == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}
    assert sampling_parameters({"stop": ["\n"], "seed": 4}) == {"stop": ["\n"], "seed": 4}


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.NOT_FOUND, False),
        (grpc.StatusCode.INTERNAL, False),
    ],
)
def test_rpc_errors_are_classified(code: grpc.StatusCode, transient: bool) -> None:
    error = classify_rpc_error(_RpcError(code, "boom"))
    assert error.transient is transient
    assert error.message == f"Triton gRPC error {code.name}: boom"


def test_a_request_past_its_grpc_deadline_is_not_tried_again_and_says_which_setting() -> None:
    """It outlived TRITON_REQUEST_TIMEOUT_S: another attempt would take as long (5 runs of one job)."""
    error = classify_rpc_error(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert error.transient is False
    assert error.message.startswith("the generation did not end within TRITON_REQUEST_TIMEOUT_S")


def test_server_messages_are_classified() -> None:
    assert (
        classify_server_message("Error generating stream: temperature must be non-negative").transient
        is False
    )
    assert classify_server_message("Request for unknown model: 'x' is not found").transient is False
    assert classify_server_message("Request for model 'm' is not ready").transient is True
    # Known to the repository but still loading (Triton just restarted): worth waiting for.
    loading = "Request for unknown model: 'sim-llm-slow' has no available versions"
    assert classify_server_message(loading).transient is True


def test_generated_text_is_decoded_as_postgres_can_store_it() -> None:
    """A NUL the model generates arrives as U+FFFD, as an undecodable byte does, in the stream's
    piece and in the text kept for the row alike."""
    from tritonclient.grpc import service_pb2

    from app.triton.inference import _Responses

    raw = "a\x00é".encode() + b"\xff"
    response = service_pb2.ModelInferResponse()
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(len(raw).to_bytes(4, "little") + raw)
    streamed: list[str] = []
    responses = _Responses(streamed.append)
    responses.add(response)
    assert responses.pieces == streamed == ["a\ufffdé\ufffd"]


def test_an_event_holds_no_line_separator_a_line_splitting_client_would_cut_it_at() -> None:
    """U+2028, U+2029 and NEL are legal raw in JSON and in SSE, but str.splitlines() (httpx's
    iter_lines, httpx-sse) splits there: escaped, the data is still the same JSON."""
    import json

    from app import sse

    payload = {"text": "a\u2028b\u2029c\x85d é 🌟"}
    raw = sse.event(json.dumps(payload, ensure_ascii=False), name="token", event_id=3).decode()
    lines = [line for line in raw.splitlines() if line]
    assert sorted(line.split(":")[0] for line in lines) == ["data", "event", "id"]
    (data,) = (line for line in lines if line.startswith("data: "))
    assert json.loads(data.removeprefix("data: ")) == payload
    assert "é 🌟" in raw  # only the separators are escaped


def test_the_backends_prefix_is_not_in_a_jobs_error() -> None:
    error = classify_server_message("Error generating stream: The decoder prompt (length 600) is too long")
    assert error.message == "The decoder prompt (length 600) is too long"
