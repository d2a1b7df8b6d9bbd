"""`python -m bench.contention`: the direct client while other processes use the CPU.

On this machine the simulated GPU (the local Triton's engine thread) shares two cores with
everything else; a real GPU's step time does not depend on the host's CPU. This measures how much
the ceiling itself drops when the CPU is as busy as during the platform phase, without the
platform: background processes burn a given amount of CPU (spread over two processes, each busy
for a share of every 10 ms) while N virtual clients drive Triton directly, as in `make bench`."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

import typer

from bench.direct import run_direct
from bench.stack import triton_only, write_rows
from bench.workload import Phase, Warmup, choose_jobs

_PERIOD_S = 0.010


def _burn(duty: float, stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        until = time.perf_counter() + duty * _PERIOD_S
        while time.perf_counter() < until:
            pass
        time.sleep((1 - duty) * _PERIOD_S)


def main(
    in_flight: int = typer.Option(256, help="N."),
    jobs: int = typer.Option(2000, help="Measured jobs per case (after N warm-up jobs)."),
    burns: str = typer.Option("0,0.5,1.0,1.3", help="CPU cores to burn in the background, per case."),
    json_out: Path | None = typer.Option(None, help="Write the figures as JSON."),
) -> None:
    rows: list[dict[str, float]] = []
    with triton_only() as triton:
        phase = Phase("latency", "sim-llm-slow", choose_jobs(max(in_flight, 256), 64), in_flight, 64, 90)
        print(f"N = {in_flight}; sim-llm-slow (20 ms prefill, 15 ms/token, 64 tokens); direct client")
        print(f"{'burn cores':>10} {'jobs/s':>8} {'vs 0':>6} {'job latency p50 ms':>19}")
        base = None
        for cores in (float(x) for x in burns.split(",")):
            stop = multiprocessing.Event()
            burners = (
                [multiprocessing.Process(target=_burn, args=(cores / 2, stop), daemon=True) for _ in range(2)]
                if cores > 0
                else []
            )
            for p in burners:
                p.start()
            try:
                r = asyncio.run(run_direct(triton.grpc_url, phase, jobs, warmup=Warmup(in_flight)))
            finally:
                stop.set()
                for p in burners:
                    p.join()
            lat = sorted(r.job_latency_s)
            p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
            base = base or r.jobs_per_s
            rows.append(
                {
                    "burn_cores": cores,
                    "jobs_per_s": round(r.jobs_per_s, 1),
                    "ratio": round(r.jobs_per_s / base, 3),
                    "job_latency_p50_ms": round(p50, 1),
                }
            )
            print(f"{cores:10.1f} {r.jobs_per_s:8.1f} {r.jobs_per_s / base:6.3f} {p50:19.1f}")
    write_rows(json_out, in_flight, jobs, rows)


if __name__ == "__main__":
    typer.run(main)
