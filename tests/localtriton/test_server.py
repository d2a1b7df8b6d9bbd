"""Against the real tritonserver with the simulated vLLM backend, through the platform's clients."""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from localtriton import LocalTriton, simulate
from localtriton_helpers import Reply, build_inputs, generate, infer, read_metric, to_reply

pytestmark = pytest.mark.integration
SIM_LEN = 512  # max_model_len of sim-llm


def test_non_streamed_matches_simulate(triton: LocalTriton) -> None:
    params = {"seed": 11, "temperature": 0.7, "max_tokens": 40}
    [reply] = generate(triton.grpc_url, "sim-llm", "Write about queues.", params, stream=False)
    expected = simulate("Write about queues.", params, SIM_LEN)
    assert reply.error is None and reply.final
    assert reply.text == expected.text
    assert reply.finish_reason == expected.finish_reason
    assert reply.num_input_tokens.shape == () and reply.num_input_tokens.dtype == np.uint32
    assert int(reply.num_input_tokens) == expected.prompt_tokens == 4
    assert reply.num_output_tokens.tolist() == [expected.completion_tokens]


def test_length_and_stop_finish_reasons(triton: LocalTriton) -> None:
    base = {"seed": 2, "max_tokens": 25, "ignore_eos": True}
    [full] = generate(triton.grpc_url, "sim-llm", "p", base, stream=False)
    assert full.finish_reason == "length" and full.num_output_tokens.tolist() == [25]
    assert full.text is not None
    word = full.text.split()[3].strip(",.")
    [cut] = generate(triton.grpc_url, "sim-llm", "p", {**base, "stop": [word]}, stream=False)
    assert cut.finish_reason == "stop" and cut.text is not None and word not in cut.text
    assert cut.text == simulate("p", {**base, "stop": [word]}, SIM_LEN).text
    eos = next(
        r
        for i in range(40)
        if (r := simulate(f"e{i}", {"seed": i, "max_tokens": 60}, SIM_LEN)).finish_reason == "stop"
    )
    i = next(i for i in range(40) if simulate(f"e{i}", {"seed": i, "max_tokens": 60}, SIM_LEN) == eos)
    [reply] = generate(triton.grpc_url, "sim-llm", f"e{i}", {"seed": i, "max_tokens": 60}, stream=False)
    assert (reply.text, reply.finish_reason) == (eos.text, "stop")


def test_seed_determinism_and_unseeded_variation(triton: LocalTriton) -> None:
    params = {"seed": 99, "temperature": 1.0, "max_tokens": 30, "ignore_eos": True}
    texts = {generate(triton.grpc_url, "sim-llm", "same", params, stream=False)[0].text for _ in range(3)}
    assert len(texts) == 1
    unseeded = {"temperature": 1.0, "max_tokens": 30, "ignore_eos": True}
    texts = {generate(triton.grpc_url, "sim-llm", "same", unseeded, stream=False)[0].text for _ in range(3)}
    assert len(texts) > 1


def test_streaming_pieces(triton: LocalTriton) -> None:
    params = {"seed": 4, "max_tokens": 12, "ignore_eos": True}
    replies = generate(triton.grpc_url, "sim-llm", "stream please", params, stream=True)
    expected = simulate("stream please", params, SIM_LEN)
    assert len(replies) == 12
    assert "".join(r.text or "" for r in replies) == expected.text
    assert [r.finish_reason for r in replies] == ["None"] * 11 + ["length"]
    assert [r.final for r in replies] == [False] * 11 + [True]
    assert [r.num_output_tokens.tolist() for r in replies] == [[1]] * 12
    assert all(int(r.num_input_tokens) == 2 for r in replies)


def test_exclude_input_false_prepends_prompt(triton: LocalTriton) -> None:
    params = {"seed": 1, "max_tokens": 5}
    [reply] = infer(
        triton.grpc_url, "sim-llm", build_inputs("Prefix here", params, stream=False, exclude=None)
    )
    assert reply.text == "Prefix here" + simulate("Prefix here", params, SIM_LEN).text
    [err] = infer(triton.grpc_url, "sim-llm", build_inputs("x", params, stream=True, exclude=False))
    assert err.error and "`exclude_input_in_output` = False is not allowed" in err.error


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -1}, "Error generating stream: temperature must be non-negative, got -1.0."),
        ({"max_tokens": 0}, "Error generating stream: max_tokens must be at least 1, got 0."),
        ({"foo": 1}, "Error generating stream: Unexpected keyword argument 'foo'"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_sampling_params(triton: LocalTriton, params: dict[str, Any], message: str, stream: bool) -> None:
    replies = generate(triton.grpc_url, "sim-llm", "hi", params, stream=stream)
    assert len(replies) == 1 and replies[0].error is not None
    assert message in replies[0].error


def test_prompt_too_long(triton: LocalTriton, http: httpx.Client) -> None:
    prompt = " ".join(["token"] * 100)
    [reply] = generate(triton.grpc_url, "sim-llm", prompt, {"max_tokens": 500}, stream=False)
    assert reply.error is not None
    assert (
        "Error generating stream: This model's maximum context length is 512 tokens. However, you requested "
        "600 tokens (100 in the messages, 500 in the completion)" in reply.error
    )
    r = http.post("/v2/models/sim-llm/generate", json={"text_input": prompt, "max_tokens": 500})
    assert r.status_code == 400 and "maximum context length is 512" in r.json()["error"]


def test_http_generate_endpoint(http: httpx.Client) -> None:
    body = {
        "text_input": "over http",
        "exclude_input_in_output": True,
        "return_finish_reason": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
        "sampling_parameters": json.dumps({"seed": 3, "max_tokens": 7, "temperature": 0.5}),
    }
    r = http.post("/v2/models/sim-llm/generate", json=body)
    assert r.status_code == 200, r.text
    expected = simulate("over http", {"seed": 3, "max_tokens": 7, "temperature": 0.5}, SIM_LEN)
    out = r.json()
    assert (out["text_output"], out["finish_reason"]) == (expected.text, expected.finish_reason)
    assert (out["num_input_tokens"], out["num_output_tokens"]) == (2, expected.completion_tokens)
    # Request parameters (keys that are not inputs) act as sampling parameters, as in vLLM's backend.
    flat = {
        "text_input": "over http",
        "exclude_input_in_output": True,
        "seed": 3,
        "max_tokens": 7,
        "temperature": 0.5,
    }
    assert http.post("/v2/models/sim-llm/generate", json=flat).json()["text_output"] == expected.text
    sse = http.post("/v2/models/sim-llm/generate_stream", json={**body, "stream": True})
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == expected.text


def test_admin_endpoints(http: httpx.Client) -> None:
    assert http.get("/v2/health/ready").status_code == 200
    for model in ("sim-llm", "sim-llm-slow", "sim-prod"):
        assert http.get(f"/v2/models/{model}/ready").status_code == 200
    index = {m["name"]: m for m in http.post("/v2/repository/index", json={}).json()}
    assert index["sim-prod"]["state"] == "READY"
    assert "sim-bad-args" in index and index["sim-bad-args"].get("state") != "READY"
    config = http.get("/v2/models/sim-llm/config").json()
    assert config["backend"] == "vllm" and config["max_batch_size"] == 0
    assert config["model_transaction_policy"]["decoupled"] is True
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["text_input"]["data_type"] == "TYPE_STRING" and not inputs["text_input"]["optional"]
    assert inputs["sampling_parameters"]["optional"]


def test_prod_style_model_json_serves(triton: LocalTriton) -> None:
    [reply] = generate(triton.grpc_url, "sim-prod", "hello", {"seed": 1, "max_tokens": 8}, stream=False)
    assert reply.text == simulate("hello", {"seed": 1, "max_tokens": 8}, 4096).text


def test_unknown_engine_arg_fails_load(http: httpx.Client) -> None:
    r = http.post("/v2/repository/models/sim-bad-args/load")
    assert r.status_code == 400
    assert "unexpected keyword argument 'not_a_vllm_arg'" in r.json()["error"]


def test_metrics_exposed(triton: LocalTriton) -> None:
    before = read_metric(triton, "vllm:prompt_tokens_total", "sim-llm")
    generate(triton.grpc_url, "sim-llm", "one two three", {"max_tokens": 4, "ignore_eos": True}, stream=False)
    deadline = time.monotonic() + 2
    while (
        read_metric(triton, "vllm:prompt_tokens_total", "sim-llm") < before + 3
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert read_metric(triton, "vllm:prompt_tokens_total", "sim-llm") == before + 3
    for name in (
        "vllm:generation_tokens_total",
        "vllm:num_requests_running",
        "sim_engine_running_requests",
        "sim_engine_peak_running_requests",
        "sim_engine_requests_total",
    ):
        read_metric(triton, name, "sim-llm")


async def _aio_request(url: str, prompt: str, params: dict[str, Any]) -> list[Reply]:
    async with grpcaio.InferenceServerClient(url) as client:

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": "sim-llm-slow", "inputs": build_inputs(prompt, params, stream=True)}

        # Read to the end of the stream rather than breaking out after the final response: a
        # client-side cancel of many streams makes tritonserver 2.51 hold the model at shutdown.
        return [
            to_reply(result, error) async for result, error in client.stream_infer(inputs_iterator=requests())
        ]


def test_many_concurrent_requests_are_batched(triton: LocalTriton) -> None:
    params = {"seed": 1, "max_tokens": 10, "ignore_eos": True}

    async def run() -> list[list[Reply]]:
        return await asyncio.gather(*(_aio_request(triton.grpc_url, f"c{i}", params) for i in range(64)))

    t0 = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - t0
    for i, replies in enumerate(results):
        assert "".join(r.text or "" for r in replies) == simulate(f"c{i}", params, SIM_LEN).text
        assert replies[-1].finish_reason == "length"
    assert read_metric(triton, "sim_engine_peak_running_requests", "sim-llm-slow") >= 32
    # 64 sequential requests would take 64 * (20 + 9 * 15) ms ~ 10 s
    assert elapsed < 5


def test_cancellation_drops_sequence(triton: LocalTriton) -> None:
    before = read_metric(triton, "sim_engine_cancelled_total", "sim-llm-slow")
    got: queue.Queue[Reply] = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: got.put(to_reply(result, error)))
    params = {"max_tokens": 400, "ignore_eos": True}
    client.async_stream_infer("sim-llm-slow", build_inputs("cancel me", params, stream=True), request_id="c")
    got.get(timeout=5)
    cancelled_at = time.monotonic()
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if read_metric(triton, "sim_engine_cancelled_total", "sim-llm-slow") > before:
            break
        time.sleep(0.05)
    assert read_metric(triton, "sim_engine_cancelled_total", "sim-llm-slow") == before + 1
    assert read_metric(triton, "sim_engine_running_requests", "sim-llm-slow") == 0
    # When it dropped the sequence, on this machine's monotonic clock (the benchmark's cancel timing).
    dropped_at = read_metric(triton, "sim_engine_last_cancel_monotonic_seconds", "sim-llm-slow")
    assert cancelled_at < dropped_at < time.monotonic()
