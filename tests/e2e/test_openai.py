"""End to end with the official `openai` client (pinned in pyproject, unchanged: only base_url and
api_key are ours) against the real API server, Celery worker, tritonserver (simulated vLLM
backend) and Postgres. The expected texts come from the simulator given the prompt the chat
template renders; each call's jobs are then read back at /results/{id}."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from localtriton.engine import IMAGE_TOKENS, simulate

from tests.conftest import ADMIN_KEY, FAST_MODEL, SLOW_MODEL, bearer
from tests.e2e.helpers import wait_for_result
from tests.localtriton.localtriton_helpers import read_metric

SIM_MAX_MODEL_LEN = 512


def chatml(*turns: tuple[str, str]) -> str:
    """sim-llm's template (plain ChatML, no default system prompt), with the generation prompt."""
    return (
        "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
        + "<|im_start|>assistant\n"
    )


@pytest.fixture
def sdk(api_server: str, worker: object, e2e_user_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api_server}/v1", api_key=e2e_user_key) as client:
        yield client


def _key(api_server: str, tenant: str, **limits: int) -> str:
    response = httpx.post(
        f"{api_server}/admin/keys",
        json={"tenant": tenant, "name": "openai e2e", **limits},
        headers=bearer(ADMIN_KEY),
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def test_a_chat_call_answers_the_simulated_text_and_its_job_is_kept(
    sdk: openai.OpenAI, api: httpx.Client
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why batch requests?"},
    ]
    completion = sdk.chat.completions.create(
        model=FAST_MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0.8,
        seed=7,
        user="alice",  # type: ignore[arg-type]
    )

    prompt = chatml(("system", "Be brief."), ("user", "Why batch requests?"))
    expected = simulate(
        prompt, {"max_tokens": 24, "temperature": 0.8, "top_p": 1.0, "seed": 7}, SIM_MAX_MODEL_LEN
    )
    assert completion.object == "chat.completion"
    assert completion.model == FAST_MODEL
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text and expected.text
    assert choice.finish_reason == expected.finish_reason
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected.prompt_tokens
    assert completion.usage.completion_tokens == expected.completion_tokens
    assert completion.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens

    result = api.get(f"/results/{completion.id}").json()  # the response's id is the job's
    assert result["status"] == "completed"
    assert result["output"] == expected.text
    assert result["params"]["openai"] == {"n": 1, "index": 0, "user": "alice"}


def test_a_conversation_goes_on_with_the_answer_message_the_sdk_returned(sdk: openai.OpenAI) -> None:
    """`messages.append(choice.message)`: the SDK sends the answer back with `refusal`, `tool_calls`
    and the like set to null; the next turn is rendered with it."""
    params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}
    messages: list[object] = [{"role": "user", "content": "Why batch requests?"}]
    first = sdk.chat.completions.create(model=FAST_MODEL, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    answer = first.choices[0].message
    assert answer.content
    for sent_back in (answer, answer.model_dump(), answer.to_dict()):
        turn = [*messages, sent_back, {"role": "user", "content": "And then?"}]
        second = sdk.chat.completions.create(model=FAST_MODEL, messages=turn, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        prompt = chatml(("user", "Why batch requests?"), ("assistant", answer.content), ("user", "And then?"))
        assert second.choices[0].message.content == simulate(prompt, params, SIM_MAX_MODEL_LEN).text

    with pytest.raises(openai.BadRequestError) as with_tools:
        call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
        turn = [*messages, {"role": "assistant", "content": "x", "tool_calls": call}]
        sdk.chat.completions.create(model=FAST_MODEL, messages=turn, max_tokens=8)  # type: ignore[arg-type]
    assert with_tools.value.param == "messages.1.tool_calls"
    assert "tool_calls is not supported" in with_tools.value.message
    with pytest.raises(openai.BadRequestError) as without_content:
        sdk.chat.completions.create(model=FAST_MODEL, messages=[{"role": "user", "content": None}])  # type: ignore[list-item]
    assert without_content.value.param == "messages.0.content"
    assert "needs content" in without_content.value.message


def test_max_tokens_ends_with_length(sdk: openai.OpenAI) -> None:
    prompt = chatml(("user", "Count to a thousand."))
    params = {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0}
    expected = simulate(prompt, params, SIM_MAX_MODEL_LEN)
    assert expected.finish_reason == "length"  # greedy text of this prompt: no EOS in 3 tokens
    completion = sdk.chat.completions.create(
        model=FAST_MODEL,
        messages=[{"role": "user", "content": "Count to a thousand."}],
        max_completion_tokens=3,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == expected.text
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_stop_sequences_cut_the_answer(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write a list of words."}]
    prompt = chatml(("user", "Write a list of words."))
    params = {"max_tokens": 40, "temperature": 1.0, "top_p": 1.0, "seed": 1}
    free = simulate(prompt, params, SIM_MAX_MODEL_LEN).text
    stop_word = next(w for w in free.split()[2:] if w.isalpha())

    completion = sdk.chat.completions.create(
        model=FAST_MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=40,
        seed=1,
        stop=[stop_word, "never-there"],
    )
    expected = simulate(prompt, {**params, "stop": [stop_word, "never-there"]}, SIM_MAX_MODEL_LEN)
    assert completion.choices[0].message.content == expected.text
    assert stop_word not in (completion.choices[0].message.content or "").split()
    assert completion.choices[0].finish_reason == "stop"


def test_n_choices_are_jobs_of_their_own(sdk: openai.OpenAI, api: httpx.Client) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=FAST_MODEL, messages=[{"role": "user", "content": "Pick a word."}], n=2, max_tokens=10, seed=3
    )
    completion = raw.parse()
    ids = raw.headers["x-result-id"].split(",")
    assert len(completion.choices) == 2 and len(set(ids)) == 2
    assert completion.id == ids[0]
    prompt = chatml(("user", "Pick a word."))
    usage = completion.usage
    assert usage is not None
    for index, (choice, rid) in enumerate(zip(completion.choices, ids, strict=True)):
        assert choice.index == index
        expected = simulate(
            prompt, {"max_tokens": 10, "temperature": 1.0, "top_p": 1.0, "seed": 3 + index}, SIM_MAX_MODEL_LEN
        )
        assert choice.message.content == expected.text
        result = api.get(f"/results/{rid}").json()
        assert result["status"] == "completed" and result["output"] == expected.text
    assert completion.choices[0].message.content != completion.choices[1].message.content
    assert usage.prompt_tokens == expected.prompt_tokens  # the prompt counts once
    assert usage.completion_tokens == sum(
        api.get(f"/results/{rid}").json()["completion_tokens"] for rid in ids
    )


def test_a_completion_of_one_and_of_several_prompts(sdk: openai.OpenAI, api: httpx.Client) -> None:
    one = sdk.completions.create(model=FAST_MODEL, prompt="Once upon a time", max_tokens=8, seed=1)
    expected = simulate(
        "Once upon a time", {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 1}, 512
    )
    assert one.object == "text_completion"
    assert one.choices[0].text == expected.text
    assert one.choices[0].finish_reason == expected.finish_reason
    assert api.get(f"/results/{one.id}").json()["output"] == expected.text

    several = sdk.completions.create(
        model=FAST_MODEL, prompt=["alpha beta", "gamma delta"], max_tokens=5, temperature=0
    )
    texts = [
        simulate(p, {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0}, 512).text
        for p in ("alpha beta", "gamma delta")
    ]
    assert [c.text for c in several.choices] == texts
    assert several.usage is not None and several.usage.prompt_tokens == 4


def test_the_model_list(sdk: openai.OpenAI) -> None:
    ids = {m.id for m in sdk.models.list()}
    assert {FAST_MODEL, SLOW_MODEL} <= ids
    assert sdk.models.retrieve(FAST_MODEL).id == FAST_MODEL
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


def test_an_image_reaches_the_vision_model(sdk: openai.OpenAI) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    completion = sdk.chat.completions.create(
        model=FAST_MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe it."},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        max_tokens=6,
        seed=2,
    )
    prompt = chatml(("user", "Describe it.\n<image>"))
    expected = simulate(prompt, {"max_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 2}, 512, images=1)
    assert completion.choices[0].message.content == expected.text
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == expected.prompt_tokens  # the engine counted the image
    assert expected.prompt_tokens == simulate(prompt, {"max_tokens": 1}, 512).prompt_tokens + IMAGE_TOKENS

    with pytest.raises(openai.BadRequestError, match="does not take images"):
        sdk.chat.completions.create(
            model=SLOW_MODEL,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
        )


def test_each_error_class(sdk: openai.OpenAI, api_server: str) -> None:
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.chat.completions.create(model="no-such-model", messages=hi)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found"

    stranger = openai.OpenAI(base_url=f"{api_server}/v1", api_key="llmq_" + "x" * 43)
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        stranger.chat.completions.create(model=FAST_MODEL, messages=hi)  # type: ignore[arg-type]
    assert unauthenticated.value.code == "invalid_api_key"

    with pytest.raises(openai.BadRequestError) as unsupported:
        sdk.chat.completions.create(
            model=FAST_MODEL,
            messages=hi,  # type: ignore[arg-type]
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        )
    assert unsupported.value.param == "tools" and "'tools' is not supported" in unsupported.value.message

    with pytest.raises(openai.BadRequestError) as invalid:
        sdk.chat.completions.create(model=FAST_MODEL, messages=hi, temperature=5)  # type: ignore[arg-type]
    assert invalid.value.param == "temperature"

    # The engine refuses a prompt longer than the model's context: the job fails, the call says why.
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.completions.create(model=FAST_MODEL, prompt="word " * 600, max_tokens=4)
    assert refused.value.code == "context_length_exceeded"  # as OpenAI names it
    assert "maximum" in refused.value.message and "512" in refused.value.message
    # Streamed too: the refusal is the call's status (as OpenAI answers), not an error after a 200.
    with pytest.raises(openai.BadRequestError) as refused_stream:
        sdk.chat.completions.create(
            model=FAST_MODEL,
            messages=[{"role": "user", "content": "word " * 600}],
            max_tokens=4,
            stream=True,
        )
    assert refused_stream.value.code == "context_length_exceeded" and refused_stream.value.status_code == 400


def test_a_client_with_an_idempotency_key_that_leaves_does_not_stop_its_job_and_the_pending_cap_is_429(
    api_server: str, worker: object
) -> None:
    tenant = f"leaver-{uuid.uuid4().hex[:8]}"
    key = _key(api_server, tenant, max_pending=1)
    client = openai.OpenAI(base_url=f"{api_server}/v1", api_key=key)
    messages = [{"role": "user", "content": "Tell me a long story."}]
    # Seed 13 makes this prompt's simulated answer 180 tokens: ~3 s on the slow model.
    expected = simulate(
        chatml(("user", "Tell me a long story.")),
        {"max_tokens": 200, "temperature": 1.0, "top_p": 1.0, "seed": 13},
        512,
    )
    assert expected.completion_tokens == 180

    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5, max_retries=0).chat.completions.create(
            model=SLOW_MODEL,
            messages=messages,
            max_tokens=200,
            seed=13,  # type: ignore[arg-type]
            extra_headers={"Idempotency-Key": f"story-{tenant}"},  # a retry with it would answer from the job
        )
    # Its job is pending: the tenant's one allowed. The client library retries a 429 by itself; not here.
    with pytest.raises(openai.RateLimitError) as over:
        client.with_options(max_retries=0).chat.completions.create(model=FAST_MODEL, messages=messages)  # type: ignore[arg-type]
    assert over.value.code == "max_pending"

    with httpx.Client(base_url=api_server, headers=bearer(key), timeout=30) as http:
        [job] = http.get("/results/", params={"model": SLOW_MODEL}).json()["items"]
        done = wait_for_result(http, job["id"])
        assert done["status"] == "completed"
        assert done["output"] == expected.text
        exported = [json.loads(line) for line in http.get("/results/export").text.splitlines()]
    assert [(line["id"], line["messages"], line["response"]) for line in exported] == [
        (job["id"], messages, expected.text)
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_a_client_that_leaves_without_an_idempotency_key_cancels_its_job(
    sdk: openai.OpenAI, api: httpx.Client, triton: object, stream: bool
) -> None:
    """Nobody can come back for such a call's jobs: the engine stops generating them (vLLM's own
    server aborts a request whose client left)."""
    running = lambda: read_metric(triton, "sim_engine_running_requests", SLOW_MODEL)  # type: ignore[arg-type]  # noqa: E731
    cancelled_before = read_metric(triton, "sim_engine_cancelled_total", SLOW_MODEL)  # type: ignore[arg-type]
    call = {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "A long one."}], "max_tokens": 400}
    leaving = sdk.with_options(timeout=2.0, max_retries=0)
    if stream:
        chunks = leaving.chat.completions.create(**call, stream=True, extra_body={"ignore_eos": True})  # type: ignore[call-overload]
        next(iter(chunks))  # the answer has begun
        result_id = chunks.response.headers["x-result-id"]
        chunks.close()
    else:
        with pytest.raises(openai.APITimeoutError):
            leaving.chat.completions.create(**call, extra_body={"ignore_eos": True})  # type: ignore[call-overload]
        [row] = [r for r in api.get("/results/", params={"model": SLOW_MODEL, "limit": 1}).json()["items"]]
        result_id = row["id"]
    done = wait_for_result(api, result_id, timeout_s=15)
    assert done["status"] == "cancelled", done
    deadline = time.monotonic() + 10  # 400 tokens would run ~6 s more
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 0
    assert read_metric(triton, "sim_engine_cancelled_total", SLOW_MODEL) > cancelled_before  # type: ignore[arg-type]


def test_a_streamed_chat_call_with_usage_adds_up_to_the_simulated_text(
    sdk: openai.OpenAI, api: httpx.Client
) -> None:
    messages = [{"role": "user", "content": "Stream me a story."}]
    stream = sdk.chat.completions.create(
        model=SLOW_MODEL,
        messages=messages,
        max_tokens=40,
        seed=11,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},  # never padded here
    )
    chunks = list(stream)
    expected = simulate(
        chatml(("user", "Stream me a story.")),
        {"max_tokens": 40, "temperature": 1.0, "top_p": 1.0, "seed": 11},
        SIM_MAX_MODEL_LEN,
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in with_choices if c.choices[0].delta.content]
    assert len(pieces) > 5  # piece by piece, as generated
    assert "".join(pieces) == expected.text
    assert with_choices[-1].choices[0].finish_reason == expected.finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )
    job = wait_for_result(api, chunks[0].id)  # the job behind the call is kept
    assert job["status"] == "completed" and job["output"] == expected.text and job["params"]["stream"] is True


def test_streamed_choices_and_a_streamed_completion(sdk: openai.OpenAI, api: httpx.Client) -> None:
    stream = sdk.chat.completions.create(
        model=FAST_MODEL,
        messages=[{"role": "user", "content": "Two of them."}],
        max_tokens=12,
        n=2,
        seed=5,
        stream=True,
    )
    texts: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str | None] = {}
    result_ids = stream.response.headers["x-result-id"].split(",")
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert len(result_ids) == 2 and set(finished) == {0, 1}
    for index, result_id in enumerate(result_ids):
        assert wait_for_result(api, result_id)["output"] == texts[index]

    completion = sdk.completions.create(
        model=FAST_MODEL, prompt="Once upon", max_tokens=8, seed=2, stream=True
    )
    parts = list(completion)
    assert all(p.object == "text_completion" for p in parts)
    text = "".join(p.choices[0].text for p in parts if p.choices)
    assert (
        text
        == simulate("Once upon", {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 2}, 512).text
    )
    assert wait_for_result(api, parts[0].id)["output"] == text and text


def test_a_streamed_call_whose_job_fails_raises_the_reason(sdk: openai.OpenAI) -> None:
    # Longer than the simulated model's context: the engine refuses it before any text, so the call
    # itself is the error (a failure after some text ends the stream with an error event instead:
    # tests/unit/test_openai_stream.py, tests/e2e/test_stream_restart.py).
    with pytest.raises(openai.BadRequestError, match="failed"):
        sdk.completions.create(model=FAST_MODEL, prompt="word " * 600, max_tokens=8, stream=True)


def test_a_body_over_the_limit_is_a_413_in_openais_shape(sdk: openai.OpenAI) -> None:
    huge = "word " * 600_000  # ~3 MB, over the API's body limit
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.chat.completions.create(model=FAST_MODEL, messages=[{"role": "user", "content": huge}])
    assert refused.value.status_code == 413
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "request_too_large" and "limit" in body["message"]


def test_a_conversation_over_the_content_limit_is_a_400(sdk: openai.OpenAI) -> None:
    """Within the body limit but over MAX_CONTENT_BYTES (4096 in these tests): a 400, as OpenAI
    answers a string over its limit, so the SDK raises BadRequestError."""
    long = "word " * 1000
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=FAST_MODEL, messages=[{"role": "user", "content": long}])
    assert refused.value.code == "string_above_max_length" and refused.value.param == "messages"
    assert "over the limit of 4096 bytes" in refused.value.message
    with pytest.raises(openai.BadRequestError) as prompt:
        sdk.completions.create(model=FAST_MODEL, prompt=long)
    assert prompt.value.code == "string_above_max_length" and prompt.value.param == "prompt"


def test_a_prompt_of_token_ids_is_refused_saying_so(sdk: openai.OpenAI) -> None:
    for prompt in ([1, 2, 3], [[1, 2], [3]]):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.completions.create(model=FAST_MODEL, prompt=prompt, max_tokens=4)
        assert refused.value.param == "prompt"
        assert "token ids are not supported as a prompt" in refused.value.message
