"""`python -m bench.jitter`: the direct client with a think time — does the Triton ceiling hold when the
N clients' jobs do not arrive in lockstep? (See bench/schedsim.py for the model.)

Starts only the local Triton, then runs the latency model directly with N in flight, each virtual client
waiting an exponentially distributed time of mean ``think`` ms before each job (0 = the benchmark's
direct mode). Prints jobs/s, the engine time per job and the share lost to the think time alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from bench.direct import run_direct
from bench.stack import triton_only, write_rows
from bench.workload import Phase, choose_jobs


def main(
    in_flight: int = typer.Option(256, help="N."),
    jobs: int = typer.Option(1500, help="Jobs per case."),
    thinks: str = typer.Option("0,50,200,500", help="Mean think times (ms) to try."),
    json_out: Path | None = typer.Option(None, help="Write the figures as JSON."),
) -> None:
    rows: list[dict[str, float]] = []
    with triton_only() as triton:
        work = choose_jobs(max(in_flight, 256), 64)

        async def run(think: float, total: int) -> tuple[float, float]:
            phase = Phase("latency", "sim-llm-slow", work, in_flight, 64, 90)
            r = await run_direct(triton.grpc_url, phase, total, think_ms=think)
            lat = sorted(r.job_latency_s)
            return r.jobs_per_s, lat[len(lat) // 2] if lat else 0.0

        asyncio.run(run(0, in_flight))  # warm-up
        base = None
        print(f"N = {in_flight}; sim-llm-slow (20 ms prefill, 15 ms/token, 64 tokens)")
        print(f"{'think ms':>8} {'jobs/s':>8} {'vs 0':>6} {'engine s/job p50':>17} {'closed-loop bound':>18}")
        for think in (float(x) for x in thinks.split(",")):
            rate, t50 = asyncio.run(run(think, jobs))
            if base is None:
                base, base_t = rate, t50
            bound = in_flight / (base_t + think / 1000) / base
            rows.append(
                {
                    "think_ms": think,
                    "jobs_per_s": round(rate, 1),
                    "ratio": round(rate / base, 3),
                    "engine_s_per_job_p50": round(t50, 3),
                    "closed_loop_bound": round(bound, 3),
                }
            )
            print(f"{think:8.0f} {rate:8.1f} {rate / base:6.3f} {t50:17.2f} {bound:18.3f}")
    write_rows(json_out, in_flight, jobs, rows)


if __name__ == "__main__":
    typer.run(main)
