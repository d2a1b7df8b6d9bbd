"""Unit tests of the pure simulation logic (no server)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from localtriton import engine, scheduler
from localtriton.engine import parse_sampling_params, plan, simulate, tokenize
from localtriton.scheduler import BatchEngine, Sequence
from localtriton.vllm_args import KNOWN_ENGINE_ARGS


def test_tokenize_words_and_punctuation() -> None:
    assert tokenize("Hello, world! It's 42.") == ["Hello", ",", "world", "!", "It", "'", "s", "42", "."]


def test_seeded_and_greedy_are_deterministic() -> None:
    a = simulate("Tell me a story", {"seed": 7, "temperature": 0.8, "max_tokens": 40})
    assert a == simulate("Tell me a story", {"seed": 7, "temperature": 0.8, "max_tokens": 40})
    assert a != simulate("Tell me a story", {"seed": 8, "temperature": 0.8, "max_tokens": 40})
    g = simulate("Tell me a story", {"temperature": 0, "max_tokens": 40, "seed": 1})
    assert g == simulate("Tell me a story", {"temperature": 0, "max_tokens": 40, "seed": 2})


def test_longer_max_tokens_extends_the_same_text() -> None:
    short = simulate("abc", {"seed": 3, "max_tokens": 5, "ignore_eos": True})
    long = simulate("abc", {"seed": 3, "max_tokens": 50, "ignore_eos": True})
    assert long.text.startswith(short.text)
    assert (short.finish_reason, short.completion_tokens, short.prompt_tokens) == ("length", 5, 1)
    assert long.completion_tokens == 50


def test_eos_ends_some_sequences_with_stop() -> None:
    results = [simulate(f"prompt {i}", {"seed": i, "max_tokens": 64}) for i in range(50)]
    stopped = [r for r in results if r.finish_reason == "stop"]
    assert stopped and len(stopped) < 50
    assert all(r.completion_tokens < 64 for r in stopped)
    ignored = [simulate(f"prompt {i}", {"seed": i, "max_tokens": 64, "ignore_eos": True}) for i in range(10)]
    assert all(r.finish_reason == "length" and r.completion_tokens == 64 for r in ignored)


def test_stop_string_cuts_output() -> None:
    full = simulate("stop test", {"seed": 5, "max_tokens": 30, "ignore_eos": True})
    word = full.text.split()[4].strip(",.")
    cut = simulate("stop test", {"seed": 5, "max_tokens": 30, "ignore_eos": True, "stop": [word]})
    assert cut.finish_reason == "stop"
    assert word not in cut.text
    assert full.text.startswith(cut.text)
    assert cut.completion_tokens < full.completion_tokens
    kept = simulate(
        "stop test",
        {"seed": 5, "max_tokens": 30, "ignore_eos": True, "stop": word, "include_stop_str_in_output": True},
    )
    assert kept.text.endswith(word)


def test_streamed_pieces_concatenate_to_text() -> None:
    p = plan("stream me", parse_sampling_params({"seed": 1, "max_tokens": 20, "stop": ["e"]}))
    pieces = [p.text[a:b] for a, b in zip((0, *p.ends), p.ends, strict=False)]
    assert "".join(pieces) == p.text
    assert len(p.ends) == p.completion_tokens


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -1}, "temperature must be non-negative, got -1.0."),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0.0."),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens must be less than or equal to max_tokens=2, got 5."),
        ({"stop": [""]}, "stop cannot contain an empty string."),
        ({"bogus": 1}, "Unexpected keyword argument 'bogus'"),
    ],
)
def test_invalid_sampling_params(params: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError)) as err:
        simulate("hi", params)
    assert str(err.value) == message


def test_prompt_too_long() -> None:
    prompt = " ".join(["word"] * 100)
    with pytest.raises(
        ValueError, match=r"maximum context length is 512 tokens\. However, you requested 600"
    ):
        simulate(prompt, {"max_tokens": 500}, max_model_len=512)
    assert simulate(prompt, {"max_tokens": 412, "ignore_eos": True}, 512).completion_tokens == 412


def test_json_string_params_and_defaults() -> None:
    r = simulate("x", json.dumps({"seed": 1, "ignore_eos": True}))
    assert r.completion_tokens == 16  # vLLM's default max_tokens


def test_engine_config(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text(
        json.dumps({"model": "Qwen/Qwen2.5-7B-Instruct-AWQ", "quantization": "awq", "max_num_seqs": 8})
    )
    cfg = engine.load_engine_config(path)
    assert (cfg.max_model_len, cfg.max_num_seqs) == (2048, 8)
    path.write_text(json.dumps({"model": "m", "max_num_seq": 8}))
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_seq'"):
        engine.load_engine_config(path)
    assert {"model", "quantization", "max_model_len", "enable_prefix_caching"} <= KNOWN_ENGINE_ARGS


class FakeSink:
    def __init__(self) -> None:
        self.pieces: list[tuple[str, int, str | None]] = []
        self.done = threading.Event()
        self.cancel = False
        self.was_cancelled = False
        self.asked: list[float] = []  # when is_cancelled() was called
        self.ask_cost_s = 0.0  # an IPC round trip's duration in the real backend

    def is_cancelled(self) -> bool:
        self.asked.append(time.monotonic())
        if self.ask_cost_s:
            time.sleep(self.ask_cost_s)
        return self.cancel

    def send(self, delta: str, n_new: int, n_total: int, finish_reason: str | None) -> None:
        self.pieces.append((delta, n_new, finish_reason))
        if finish_reason is not None:
            self.done.set()

    def cancelled(self) -> None:
        self.was_cancelled = True
        self.done.set()


def _seq(prompt: str, stream: bool, max_tokens: int = 10) -> tuple[Sequence, FakeSink]:
    sink = FakeSink()
    p = plan(prompt, parse_sampling_params({"seed": 1, "max_tokens": max_tokens, "ignore_eos": True}))
    return Sequence(p, sink, stream), sink


def test_batch_engine_zero_latency_stream_and_not() -> None:
    eng = BatchEngine()
    eng.start()
    s1, k1 = _seq("a", stream=True)
    s2, k2 = _seq("b", stream=False)
    eng.submit(s1)
    eng.submit(s2)
    assert k1.done.wait(2) and k2.done.wait(2)
    eng.stop()
    assert "".join(p[0] for p in k1.pieces) == s1.plan.text
    assert [p[2] for p in k1.pieces] == [None] * 9 + ["length"]
    assert k2.pieces == [(s2.plan.text, 10, "length")]
    assert eng.stats.generation_tokens == 20 and eng.stats.finished == 2


def test_batch_engine_batches_with_latency_and_respects_max_num_seqs() -> None:
    eng = BatchEngine(prefill_ms=10, decode_ms=5, max_num_seqs=4)
    eng.start()
    seqs = [_seq(f"p{i}", stream=False, max_tokens=10) for i in range(8)]
    t0 = time.monotonic()
    for s, _ in seqs:
        eng.submit(s)
    assert all(k.done.wait(5) for _, k in seqs)
    elapsed = time.monotonic() - t0
    eng.stop()
    assert eng.stats.peak_running == 4
    # two waves of 4: each at least prefill + 9 decode steps
    assert elapsed >= 2 * (0.010 + 9 * 0.005)


def test_batch_engine_drops_cancelled_sequence() -> None:
    eng = BatchEngine(decode_ms=5)
    eng.start()
    s, k = _seq("c", stream=True, max_tokens=1000)
    eng.submit(s)
    time.sleep(0.05)
    k.cancel = True
    assert k.done.wait(2) and k.was_cancelled
    time.sleep(0.02)
    eng.stop()
    assert eng.stats.cancelled == 1 and eng.stats.running == 0
    assert len(k.pieces) < 1000


def test_each_sequence_is_asked_about_cancellation_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler, "CANCEL_CHECK_INTERVAL_S", 0.05)
    eng = BatchEngine(decode_ms=5)
    seqs = [_seq(f"p{i}", stream=False, max_tokens=2000) for i in range(8)]
    eng.start()
    for s, _ in seqs:
        eng.submit(s)
    time.sleep(0.6)
    seqs[3][1].cancel = True
    assert seqs[3][1].done.wait(2) and seqs[3][1].was_cancelled
    assert not any(sink.was_cancelled for i, (_, sink) in enumerate(seqs) if i != 3)
    eng.stop()
    for _, sink in seqs:
        gaps = [b - a for a, b in zip(sink.asked, sink.asked[1:], strict=False)]
        assert len(sink.asked) >= 5, "every running sequence is asked, not only some"
        assert min(gaps) >= 0.05, "never asked again before its interval has passed"


def test_cancellation_checks_fill_the_step_instead_of_lengthening_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 sequences whose is_cancelled() takes 1 ms: asking all of them takes 40 ms, four 10 ms steps.
    monkeypatch.setattr(scheduler, "CANCEL_CHECK_INTERVAL_S", 0.0)
    eng = BatchEngine(decode_ms=10)
    seqs = [_seq(f"p{i}", stream=False, max_tokens=2000) for i in range(40)]
    for _, sink in seqs:
        sink.ask_cost_s = 0.001
    eng.start()
    for s, _ in seqs:
        eng.submit(s)
    time.sleep(0.5)
    eng.stop()
    asked = sorted(t for _, sink in seqs for t in sink.asked)
    steps = eng.stats.generation_tokens / 40
    # At most a step's worth each step: the steps keep their length, so the 0.5 s hold about 50 of
    # them rather than about 10.
    assert steps >= 30
    assert len(asked) <= steps * 10 + 40
    # Asked in rotation (each step asks those left out by the one before): every sequence about as
    # often as the others, however many asks a step's idle time held on this machine.
    counts = [len(sink.asked) for _, sink in seqs]
    assert min(counts) >= 2 and max(counts) - min(counts) <= 2, counts


def test_the_real_engine_runs_float32_on_a_cpu_without_bf16_instructions(tmp_path: Path) -> None:
    """bfloat16 without the CPU's bf16 instructions is several times slower than float32."""
    from localtriton.cpu import cpu_flags, engine_dtype

    avx2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
    assert engine_dtype("bfloat16", avx2) == "float32"
    assert engine_dtype("auto", avx2) == engine_dtype(None, avx2) == "float32"
    assert engine_dtype("bfloat16", avx2 | {"avx512f", "avx512_bf16"}) == "bfloat16"
    assert engine_dtype("bfloat16", avx2 | {"amx_bf16"}) == "bfloat16"
    assert engine_dtype("float16", avx2) == "float16"  # asked for: as asked
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
