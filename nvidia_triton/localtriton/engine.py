"""Pure-Python simulation of a vLLM engine: tokenizer, sampling parameters, deterministic text.

Nothing here imports Triton, so the platform's tests can call :func:`simulate` to know the exact
text the local Triton returns. The batching/latency loop is in :mod:`localtriton.scheduler`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localtriton.vllm_args import KNOWN_ENGINE_ARGS

DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_MAX_NUM_SEQS = 256
# Per-token chance of emitting EOS: with vLLM's default max_tokens=16 about 40% of sequences
# end with "stop" before "length", so clients see both finish reasons.
EOS_PROBABILITY = 0.03
PUNCT_PROBABILITY = 0.08
GREEDY_EPSILON = 1e-5  # vLLM treats temperature below this as greedy sampling
IMAGE_TOKENS = 16  # prompt tokens per image of the `image` input

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

VOCAB: tuple[str, ...] = tuple(
    [
        "the",
        "a",
        "of",
        "to",
        "and",
        "in",
        "that",
        "it",
        "is",
        "was",
        "for",
        "on",
        "with",
        "as",
        "by",
        "at",
        "from",
        "this",
        "be",
        "are",
        "or",
        "an",
        "not",
        "but",
        "have",
        "has",
        "had",
        "which",
        "one",
        "all",
        "were",
        "when",
        "there",
        "can",
        "more",
        "their",
        "if",
        "will",
        "about",
        "would",
        "so",
        "what",
        "up",
        "out",
        "them",
        "some",
        "time",
        "into",
        "could",
        "than",
        "other",
        "then",
        "its",
        "only",
        "new",
        "like",
        "these",
        "two",
        "may",
        "first",
        "any",
        "way",
        "also",
        "use",
        "after",
        "work",
        "well",
        "because",
        "people",
        "good",
        "great",
        "system",
        "model",
        "data",
        "queue",
        "job",
        "result",
        "token",
        "batch",
        "server",
        "request",
        "response",
        "worker",
        "stream",
        "engine",
        "memory",
        "latency",
        "throughput",
        "context",
        "prompt",
        "answer",
        "question",
        "simple",
        "quick",
        "small",
        "large",
        "fast",
        "slow",
        "early",
        "late",
        "bright",
        "dark",
        "river",
        "mountain",
        "forest",
        "city",
        "garden",
        "window",
        "silver",
        "golden",
        "paper",
        "stone",
        "cloud",
        "signal",
        "pattern",
        "number",
        "value",
        "record",
        "table",
        "index",
        "network",
        "packet",
        "channel",
        "kernel",
        "thread",
        "process",
        "signal",
        "buffer",
        "cache",
        "vector",
        "matrix",
        "tensor",
        "layer",
        "weight",
        "gradient",
        "sample",
        "random",
        "seed",
        "order",
        "level",
        "state",
        "event",
    ]
)
_PUNCT = (",", ".")


def tokenize(text: str) -> list[str]:
    """Words and single punctuation marks: a stand-in for a real tokenizer, stable and cheap."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    return len(tokenize(text))


# ---------------------------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------------------------

# Fields of vLLM's SamplingParams; the value is the type a JSON value is coerced to (like
# TritonSamplingParams.from_dict does), None = taken as is.
_PARAM_TYPES: dict[str, type | None] = {
    "n": int,
    "best_of": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "seed": int,
    "stop": None,
    "stop_token_ids": None,
    "bad_words": None,
    "ignore_eos": bool,
    "max_tokens": int,
    "min_tokens": int,
    "logprobs": int,
    "prompt_logprobs": int,
    "detokenize": bool,
    "skip_special_tokens": bool,
    "spaces_between_special_tokens": bool,
    "include_stop_str_in_output": bool,
    "truncate_prompt_tokens": int,
    "logit_bias": None,
    "allowed_token_ids": None,
    "guided_decoding": None,
    "structured_outputs": None,
    "extra_args": None,
    "use_beam_search": bool,
    "length_penalty": float,
    "early_stopping": None,
    "output_kind": None,
    "logits_processors": None,
    "lora_name": None,
}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    lora_name: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON


def parse_sampling_params(raw: str | dict[str, Any] | None) -> SamplingParams:
    """Parse and validate like ``TritonSamplingParams.from_dict`` + vLLM's ``_verify_args``.

    Raises ValueError/TypeError with vLLM's wording; the backend prefixes it with
    ``Error generating stream:``.
    """
    if raw is None or raw == "":
        data: dict[str, Any] = {}
    elif isinstance(raw, str):
        loaded = json.loads(raw)
        if not isinstance(loaded, dict):
            raise ValueError(f"sampling_parameters must be a JSON object, got {type(loaded).__name__}")
        data = loaded
    else:
        data = dict(raw)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:  # vLLM backend drops None so that defaults apply
            continue
        if key not in _PARAM_TYPES:
            raise TypeError(f"Unexpected keyword argument '{key}'")
        kind = _PARAM_TYPES[key]
        values[key] = kind(value) if kind is not None else value
    _verify(values)
    stop = values.get("stop", ())
    return SamplingParams(
        max_tokens=values.get("max_tokens", 16),
        temperature=values.get("temperature", 1.0),
        top_p=values.get("top_p", 1.0),
        top_k=values.get("top_k", -1),
        seed=values.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(str(s) for s in stop),
        ignore_eos=values.get("ignore_eos", False),
        min_tokens=values.get("min_tokens", 0),
        include_stop_str_in_output=values.get("include_stop_str_in_output", False),
        logprobs=values.get("logprobs"),
        lora_name=values.get("lora_name"),
    )


def _verify(v: dict[str, Any]) -> None:
    def bad(message: str) -> ValueError:
        return ValueError(message)

    if v.get("n", 1) < 1:
        raise bad(f"n must be at least 1, got {v['n']}.")
    if v.get("n", 1) != 1 or v.get("best_of", 1) != 1:
        raise bad("the sim backend supports only n=1 and best_of=1")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= v.get(name, 0.0) <= 2.0:
            raise bad(f"{name} must be in [-2, 2], got {v[name]}.")
    if v.get("repetition_penalty", 1.0) <= 0.0:
        raise bad(f"repetition_penalty must be greater than zero, got {v['repetition_penalty']}.")
    if v.get("temperature", 1.0) < 0.0:
        raise bad(f"temperature must be non-negative, got {v['temperature']}.")
    if not 0.0 < v.get("top_p", 1.0) <= 1.0:
        raise bad(f"top_p must be in (0, 1], got {v['top_p']}.")
    if v.get("top_k", -1) < -1:
        raise bad(f"top_k must be -1 (disable), or at least 1, got {v['top_k']}.")
    if not 0.0 <= v.get("min_p", 0.0) <= 1.0:
        raise bad(f"min_p must be in [0, 1], got {v['min_p']}.")
    max_tokens = v.get("max_tokens", 16)
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"max_tokens must be at least 1, got {max_tokens}.")
    min_tokens = v.get("min_tokens", 0)
    if min_tokens < 0:
        raise bad(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.")
    if v.get("logprobs") is not None and v["logprobs"] < 0:
        raise bad(f"logprobs must be non-negative, got {v['logprobs']}.")
    stop = v.get("stop", [])
    if not isinstance(stop, str | list) or not all(isinstance(s, str) for s in stop):
        raise bad(f"stop must be a string or a list of strings, got {stop!r}.")
    if (stop == "") or (isinstance(stop, list) and "" in stop):
        raise bad("stop cannot contain an empty string.")


# ---------------------------------------------------------------------------------------------
# Generation plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Everything a sequence will produce, computed up front so streaming equals non-streaming."""

    prompt: str
    prompt_tokens: int
    text: str  # final text (stop string cut off), without the prompt
    finish_reason: str  # "stop" | "length"
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    # text length visible after each token: streamed deltas are text[ends[i-1]:ends[i]]
    ends: tuple[int, ...]

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SimResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """Return the effective max_tokens or raise vLLM's context-length error."""
    if prompt_tokens == 0:
        raise ValueError("The decoder prompt cannot be empty")
    if prompt_tokens > max_model_len:
        raise ValueError(
            f"The decoder prompt (length {prompt_tokens}) is longer than the maximum model length "
            f"of {max_model_len}. This model's maximum context length is {max_model_len} tokens."
        )
    if max_tokens is None:  # vLLM: generate up to the end of the context
        return max_model_len - prompt_tokens
    if prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    return max_tokens


def _rng_for(prompt: str, p: SamplingParams) -> random.Random:
    # hashlib, not hash(): Python's str hash is salted per process, the text must be stable.
    if p.greedy:
        key = f"greedy\x00{prompt}"
    elif p.seed is not None:
        key = f"seed\x00{p.seed}\x00{p.temperature!r}\x00{p.top_p!r}\x00{p.top_k}\x00{prompt}"
    else:  # like vLLM: sampling without a seed differs from call to call
        return random.Random()
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def image_tokens(images: list[bytes]) -> int:
    """Prompt tokens the images take, like a vision encoder's patches (a fixed count per image);
    each must be a PNG or JPEG, as the real backend's PIL requires."""
    for raw in images:
        if not raw.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
            raise ValueError("cannot identify image file")
    return IMAGE_TOKENS * len(images)


def plan(
    prompt: str,
    params: SamplingParams,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    extra_prompt_tokens: int = 0,
) -> Plan:
    """`extra_prompt_tokens`: what the prompt's images take (see `image_tokens`)."""
    prompt_tokens = count_tokens(prompt) + extra_prompt_tokens
    max_tokens = check_context(prompt_tokens, params.max_tokens, max_model_len)
    rng = _rng_for(prompt, params)
    pieces: list[str] = []
    ids: list[int] = []
    logprobs: list[float] = []
    ends: list[int] = []
    text = ""
    finish = "length"
    longest_stop = max((len(s) for s in params.stop), default=0)
    for i in range(max_tokens):
        # Always draw the same numbers per step so that a larger max_tokens extends the text.
        r_eos, r_punct, r_word = rng.random(), rng.random(), rng.random()
        logprobs.append(math.log(0.05 + 0.9 * r_word) / 4)
        if r_eos < EOS_PROBABILITY and i >= params.min_tokens and not params.ignore_eos:
            ids.append(len(VOCAB) + len(_PUNCT))  # EOS counts as a token but adds no text
            ends.append(len(text))
            finish = "stop"
            break
        if i > 0 and r_punct < PUNCT_PROBABILITY and pieces[-1] not in _PUNCT:
            idx = int(r_word * len(_PUNCT))
            piece, token_id = _PUNCT[idx], len(VOCAB) + idx
        else:
            idx = int(r_word * len(VOCAB))
            piece, token_id = " " + VOCAB[idx], idx
        pieces.append(piece)
        ids.append(token_id)
        start = max(0, len(text) - longest_stop + 1)
        text += piece
        if params.stop and i + 1 >= params.min_tokens:
            cut = _find_stop(text, params, start)
            if cut is not None:
                text = text[:cut]
                ends.append(len(text))
                finish = "stop"
                break
        ends.append(len(text))
    return Plan(prompt, prompt_tokens, text, finish, tuple(ids), tuple(logprobs[: len(ids)]), tuple(ends))


def _find_stop(text: str, params: SamplingParams, start: int) -> int | None:
    best: int | None = None
    for s in params.stop:
        j = text.find(s, start)
        if j >= 0:
            cut = j + len(s) if params.include_stop_str_in_output else j
            best = cut if best is None else min(best, cut)
    return best


def simulate(
    prompt: str,
    params: dict[str, Any] | str | None = None,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    images: int = 0,
) -> SimResult:
    """What the local Triton returns for a non-streamed request with exclude_input_in_output=true.

    Deterministic when ``seed`` is set or ``temperature`` is 0. Raises ValueError/TypeError with
    the message the server sends after ``Error generating stream: ``. Use the model's
    max_model_len (512 for the built-in ``sim-llm``); ``images``: how many the request carried.
    """
    p = plan(prompt, parse_sampling_params(params), max_model_len, IMAGE_TOKENS * images)
    return SimResult(p.text, p.finish_reason, p.prompt_tokens, p.completion_tokens)


# ---------------------------------------------------------------------------------------------
# model.json
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    args: dict[str, Any] = field(default_factory=dict)
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    disable_log_stats: bool = False


def load_engine_config(path: Path) -> EngineConfig:
    """Read ``model.json`` and fail on unknown keys the way ``AsyncEngineArgs(**json)`` does."""
    if not path.is_file():
        raise FileNotFoundError(
            f"'model.json' containing vllm engine args must be provided in '{path.parent}'"
        )
    args = json.loads(path.read_text())
    if not isinstance(args, dict):
        raise ValueError(f"{path}: expected a JSON object of vLLM engine args")
    unknown = sorted(set(args) - KNOWN_ENGINE_ARGS)
    if unknown:
        raise TypeError(
            f"AsyncEngineArgs.__init__() got an unexpected keyword argument '{unknown[0]}' "
            f"(unknown vLLM engine args in {path}: {', '.join(unknown)})"
        )
    if "model" not in args:
        raise ValueError(f"{path}: 'model' is required")
    max_model_len = int(args.get("max_model_len") or DEFAULT_MAX_MODEL_LEN)
    max_num_seqs = int(args.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS)
    if max_model_len < 1 or max_num_seqs < 1:
        raise ValueError(f"{path}: max_model_len and max_num_seqs must be positive")
    return EngineConfig(
        args, max_model_len, max_num_seqs, str(args.get("disable_log_stats")).lower() == "true"
    )
