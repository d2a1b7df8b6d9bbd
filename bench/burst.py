"""`python -m bench.burst`: what one burst of submits costs the API, on a stack with nothing else to do.

In the latency scenario jobs end in waves (every job is 64 tokens), and each wave brings 60-90 submits
within a few ms; the last of them waits for the API to handle all the others. This sends such bursts
(`--burst` concurrent `POST /models/send`, then a pause) to a running API and prints the API process's
CPU per submit (from /proc, every thread) and the latency of the burst's submits. Start the stack
with its worker stopped, so that nothing but the submits runs, e.g.:

    LLMQ_LIGHT=1 API_PORT=9191 CELERY_QUEUE=burst .venv/bin/python -m devstack up &
    kill -STOP <the worker's pid>        # jobs stay pending; nothing else takes the CPU
    .venv/bin/python -m bench.burst --api-url http://127.0.0.1:9191 --api-pid <uvicorn's pid>

Pending jobs pile up (rounds x burst): raise MAX_PENDING_PER_TENANT and SUBMIT_RATE_PER_KEY for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import typer

from bench.httpclient import LeanClient

DEV_ADMIN_KEY = "llmq_dev-admin-key-for-this-machine-only"


def process_cpu_s(pid: int) -> float:
    """User + system CPU of every thread of `pid`."""
    ticks = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def main(
    api_url: str = typer.Option(..., help="The API, e.g. http://127.0.0.1:9191."),
    api_pid: int = typer.Option(..., help="Its uvicorn process, whose CPU is counted."),
    api_key: str = typer.Option(DEV_ADMIN_KEY, help="A key of the stack."),
    model: str = typer.Option("sim-llm", help="Model the jobs are sent to."),
    burst: int = typer.Option(80, help="Concurrent submits per burst."),
    rounds: int = typer.Option(40, help="Bursts measured (after 3 unmeasured)."),
    pause_s: float = typer.Option(0.25, help="Pause between bursts."),
) -> None:
    async def run() -> dict[str, float]:
        async with LeanClient(api_url, burst + 4, api_key=api_key) as client:
            context = await client.post("/contexts/", {"content": "a burst of submits"})
            url = f"/models/send/{model}/{context.json()['id']}"
            body = {"max_tokens": 64, "temperature": 1.0, "top_p": 1.0, "seed": 1}
            latencies: list[float] = []
            drains: list[float] = []

            async def submit(kept: list[float]) -> None:
                started = time.monotonic()
                reply = await client.post(url, body)
                if reply.status_code != 202:
                    raise RuntimeError(f"POST {url}: {reply.status_code} {reply.text}")
                kept.append(time.monotonic() - started)

            for _ in range(3):  # warm the connections and the statement cache
                await asyncio.gather(*(submit([]) for _ in range(burst)))
                await asyncio.sleep(pause_s)
            cpu_before = process_cpu_s(api_pid)
            for _ in range(rounds):
                started = time.monotonic()
                await asyncio.gather(*(submit(latencies) for _ in range(burst)))
                drains.append(time.monotonic() - started)
                await asyncio.sleep(pause_s)
            cpu_s = process_cpu_s(api_pid) - cpu_before
        latencies.sort()

        def at(share: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(share * len(latencies)))] * 1000, 1)

        return {
            "api_cpu_ms_per_submit": round(cpu_s * 1000 / (burst * rounds), 3),
            "submit_p50_ms": at(0.5),
            "submit_p90_ms": at(0.9),
            "submit_p99_ms": at(0.99),
            "burst_drained_p50_ms": round(statistics.median(drains) * 1000, 1),
        }

    print(json.dumps(asyncio.run(run())))


if __name__ == "__main__":
    typer.run(main)
